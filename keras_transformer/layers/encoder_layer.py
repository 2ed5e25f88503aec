"""One encoder layer: self-attention and feed-forward, each in a residual block (§3.1)."""

import keras

from keras_transformer.layers.transformer_layer import TransformerLayerBase


@keras.saving.register_keras_serializable(package="keras_transformer")
class TransformerEncoderLayer(TransformerLayerBase):
    """Self-attention over the source, then a position-wise feed-forward network.

    Args: those of `TransformerLayerBase` (`num_heads`, `ffn_dim`, `dropout`,
        `attention_dropout`, `norm_placement`, `layer_norm_epsilon`).

    Call arguments:
        inputs: `[batch, source_length, model_dim]`.
        padding_mask: boolean `[batch, source_length]`, `False` at padding; padded keys get
            no attention weight, so padding never changes the real positions' outputs.
        return_attention_scores: also return the self-attention weights.
        training: enables dropout.

    Returns:
        `[batch, source_length, model_dim]`; with `return_attention_scores=True`,
        `(outputs, weights [batch, num_heads, source_length, source_length])`.
    """

    def build(self, inputs_shape):
        self._check_model_dim(inputs_shape)
        self.self_attention, self.self_attention_block = self._attention_block(
            "self_attention", inputs_shape
        )
        self.feed_forward, self.feed_forward_block = self._feed_forward_block(inputs_shape)
        self.built = True

    def call(self, inputs, padding_mask=None, return_attention_scores=False, training=None):
        x, weights = self._attend(
            self.self_attention,
            self.self_attention_block,
            inputs,
            attention_mask=padding_mask,
            training=training,
        )
        x = self._feed_forward(x, training=training)
        return (x, weights) if return_attention_scores else x
