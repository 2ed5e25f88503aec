"""`Dropout`: `keras.layers.Dropout` with a cheaper mask on TensorFlow and JAX."""

import keras

from keras_transformer.layers.dropout_levels import effective_rate, resolve_bits


@keras.saving.register_keras_serializable(package="keras_transformer")
class Dropout(keras.layers.Layer):
    """Inverted dropout, as `keras.layers.Dropout`, whose mask costs fewer random bits on
    TensorFlow and JAX (`dropout_tf`, `dropout_jax`): there each element gets an 8-bit uniform
    number, so the rate is rounded to a multiple of 1/256 (0.1 -> 0.1016), or a 16-bit one
    where that would move the rate by more than 2% of itself (0.01 -> 0.009995); kept
    elements are scaled by the inverse of the rounded keep probability (`dropout_levels`), so
    the expectation is unchanged. `effective_rate` is the rounded rate. Other backends call
    `keras.random.dropout` with `rate` as given.

    Args:
        rate: drop probability, in `[0, 1)`.
        seed: seed of the layer's `keras.random.SeedGenerator`.
        bits: 8 or 16 bits per element's number on TensorFlow and JAX; None (the default)
            lets `dropout_levels` choose by the rate as above.

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

    def __init__(self, rate, seed=None, bits=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate!r}")
        # Errors naming the value here rather than in a trace.
        resolved = resolve_bits(rate, bits)
        if rate > 0 and effective_rate(rate, resolved) == 0:
            raise ValueError(
                f"Dropout rate {rate!r} rounds to 0 with {resolved}-bit numbers (no element "
                "would be dropped); use bits=16, or rate 0"
            )
        self.rate = float(rate)
        self.seed = seed
        self.bits = bits
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

            return dropout_tf.dropout(
                inputs, self.rate, self.seed_generator.next(), keep, self.bits
            )
        if backend == "jax":
            from keras_transformer.layers import dropout_jax

            return dropout_jax.dropout(
                inputs, self.rate, self.seed_generator.next(), keep, self.bits
            )
        if keep is not None:
            inputs = keras.ops.where(keep, inputs, keras.ops.zeros_like(inputs))
        return keras.random.dropout(inputs, self.rate, seed=self.seed_generator)

    @property
    def effective_rate(self) -> float:
        """The drop probability of this backend's masks (`rate` rounded as above)."""
        if keras.config.backend() in ("tensorflow", "jax"):
            return effective_rate(self.rate, self.bits)
        return self.rate

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed, "bits": self.bits}
