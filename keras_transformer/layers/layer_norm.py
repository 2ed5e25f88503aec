"""`LayerNorm`: `keras.layers.LayerNormalization` with a cheaper gradient on TensorFlow."""

import keras


@keras.saving.register_keras_serializable(package="keras_transformer")
class LayerNorm(keras.layers.LayerNormalization):
    """Layer normalization over the last axis, as `keras.layers.LayerNormalization`, whose
    TensorFlow training step uses a hand-written gradient (`layer_norm_tf`): automatic
    differentiation of `tf.nn.moments` and the normalization costs about 60 graph ops per norm
    and the hand-written one about 15 (the bf16 training step: 1.014x `small`, 1.028x `base`,
    `benchmarks/results/training_step_ab_layernorm_*.json`). Outside
    training (and on other backends) it is `keras.layers.LayerNormalization` itself, so
    inference graphs and their outputs are unchanged. Same weights (`gamma`, `beta`), same
    checkpoints.

    Args:
        epsilon: added to the variance.
        **kwargs: `keras.layers.LayerNormalization`'s, except `axis` (always -1),
            `rms_scaling` (False) and `center`/`scale` (True).

    Call arguments:
        inputs: a float tensor `[..., features]`.
        training: the hand-written gradient is used only when true, on TensorFlow.

    Returns:
        A tensor of the shape and dtype of `inputs`.
    """

    # What the hand-written gradient assumes; `get_config` leaves them out.
    FIXED = {"axis": -1, "rms_scaling": False, "center": True, "scale": True}

    def __init__(self, epsilon=1e-6, **kwargs):
        for name, value in self.FIXED.items():
            given = kwargs.pop(name, value)
            if given != value:
                raise ValueError(f"LayerNorm supports only {name}={value!r}, got {given!r}")
        super().__init__(epsilon=epsilon, **self.FIXED, **kwargs)

    def call(self, inputs, training=None):
        if training and keras.config.backend() == "tensorflow":
            from keras_transformer.layers import layer_norm_tf

            outputs = layer_norm_tf.layer_norm(inputs, self.gamma, self.beta, self.epsilon)
            return keras.ops.cast(outputs, self.compute_dtype)
        return super().call(inputs)

    def get_config(self):
        config = super().get_config()
        for name in self.FIXED:
            config.pop(name)
        return config
