"""`Dropout`: `keras.layers.Dropout` with a cheaper mask on TensorFlow and JAX."""

import keras


@keras.saving.register_keras_serializable(package="keras_transformer")
class Dropout(keras.layers.Layer):
    """Inverted dropout, as `keras.layers.Dropout`, whose mask costs fewer random numbers on
    TensorFlow and JAX (`dropout_tf`, `dropout_jax`): there each element gets a 16-bit uniform
    number, so the rate is rounded to a multiple of 1/65536 (0.1 -> 0.100006) and kept
    elements are scaled by the inverse of the rounded keep probability (`dropout_levels`); the
    expectation is unchanged. Other backends call `keras.random.dropout`.

    Args:
        rate: drop probability, in `[0, 1)`.
        seed: seed of the layer's `keras.random.SeedGenerator`.

    Call arguments:
        inputs: a float tensor of any shape.
        training: drops only when true.
        keep: optional boolean tensor of the shape of `inputs`: where it is false the element
            is zeroed too, training or not (when training, by the same mask multiply as the
            drop). `PositionwiseFeedForward` folds its ReLU into the mask this way
            (`keep=x > 0`).

    Returns:
        A tensor of the shape and dtype of `inputs`.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed
        self.supports_masking = True
        if self.rate > 0:
            self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    def call(self, inputs, training=False, keep=None):
        if not training or self.rate == 0:
            if keep is None:
                return inputs
            return keras.ops.where(keep, inputs, keras.ops.zeros_like(inputs))
        backend = keras.config.backend()
        if backend == "tensorflow":
            from keras_transformer.layers import dropout_tf

            return dropout_tf.dropout(inputs, self.rate, self.seed_generator.next(), keep)
        if backend == "jax":
            from keras_transformer.layers import dropout_jax

            return dropout_jax.dropout(inputs, self.rate, self.seed_generator.next(), keep)
        if keep is not None:
            inputs = keras.ops.where(keep, inputs, keras.ops.zeros_like(inputs))
        return keras.random.dropout(inputs, self.rate, seed=self.seed_generator)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
