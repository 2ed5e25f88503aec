"""The residual wrapper around every sub-layer: post-norm (the paper) or pre-norm."""

import keras

from keras_transformer.layers.dropout import Dropout
from keras_transformer.layers.layer_norm import LayerNorm


class ResidualBlock(keras.layers.Layer):
    """`LayerNorm(x + Dropout(f(x)))` (post-norm, §5.4) or `x + Dropout(f(LayerNorm(x)))`.

    Created by the encoder and decoder layers in their `build()`; it holds the norm and dropout
    of one sub-layer, while the owner calls the sub-layer itself between `normalize_input` and
    `combine` (a sub-layer may take extra arguments such as masks or caches).

    Args:
        norm_placement: `"post"` or `"pre"`.
        epsilon: layer-norm epsilon.
        dropout: residual dropout rate.
    """

    def __init__(self, norm_placement="post", epsilon=1e-6, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.norm_placement = norm_placement
        self.epsilon = float(epsilon)
        self.dropout = float(dropout)
        self.pre_norm = norm_placement == "pre"
        self.layer_norm = LayerNorm(
            epsilon=self.epsilon, dtype=self.dtype_policy, name="layer_norm"
        )
        self.dropout_layer = Dropout(self.dropout, name="dropout")

    def build(self, inputs_shape):
        self.layer_norm.build(inputs_shape)
        self.built = True

    def normalize_input(self, inputs, training=None):
        """What the sub-layer sees: the normalized input under pre-norm, else the input."""
        return self.layer_norm(inputs, training=training) if self.pre_norm else inputs

    def call(self, inputs, sublayer_output, training=None):
        """Adds the sub-layer's output back to its input, normalizing after under post-norm."""
        outputs = inputs + self.dropout_layer(sublayer_output, training=training)
        return outputs if self.pre_norm else self.layer_norm(outputs, training=training)

    def compute_output_shape(self, inputs_shape, sublayer_output_shape=None):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            norm_placement=self.norm_placement, epsilon=self.epsilon, dropout=self.dropout
        )
        return config
