"""One encoder layer: self-attention and feed-forward, each in a residual block (§3.1)."""

import keras

from keras_transformer.layers.feed_forward import PositionwiseFeedForward
from keras_transformer.layers.multi_head_attention import MultiHeadAttention
from keras_transformer.layers.residual import ResidualBlock


@keras.saving.register_keras_serializable(package="keras_transformer")
class TransformerEncoderLayer(keras.layers.Layer):
    """Self-attention over the source, then a position-wise feed-forward network.

    Args:
        num_heads: attention heads.
        ffn_dim: inner size of the feed-forward network.
        dropout: residual and feed-forward dropout.
        attention_dropout: dropout on attention weights.
        norm_placement: `"post"` (paper) or `"pre"`.
        layer_norm_epsilon: epsilon of the layer norms.

    Call arguments:
        inputs: `[batch, source_length, model_dim]`.
        padding_mask: boolean `[batch, source_length]`, `False` at padding; padded keys get
            no attention weight, so padding never changes the real positions' outputs.
        training: enables dropout.

    Returns:
        `[batch, source_length, model_dim]`.
    """

    def __init__(
        self,
        num_heads,
        ffn_dim,
        dropout=0.0,
        attention_dropout=0.0,
        norm_placement="post",
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.ffn_dim = int(ffn_dim)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.norm_placement = norm_placement
        self.layer_norm_epsilon = float(layer_norm_epsilon)

    def build(self, inputs_shape):
        model_dim = inputs_shape[-1]
        if model_dim % self.num_heads:
            raise ValueError(
                f"model_dim ({model_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        block = dict(
            norm_placement=self.norm_placement,
            epsilon=self.layer_norm_epsilon,
            dropout=self.dropout,
            dtype=self.dtype_policy,
        )
        self.self_attention = MultiHeadAttention(
            self.num_heads,
            model_dim // self.num_heads,
            dropout=self.attention_dropout,
            dtype=self.dtype_policy,
            name="self_attention",
        )
        self.self_attention.build(inputs_shape)
        self.self_attention_block = ResidualBlock(name="self_attention_residual", **block)
        self.self_attention_block.build(inputs_shape)
        self.feed_forward = PositionwiseFeedForward(
            self.ffn_dim, dropout=self.dropout, dtype=self.dtype_policy, name="feed_forward"
        )
        self.feed_forward.build(inputs_shape)
        self.feed_forward_block = ResidualBlock(name="feed_forward_residual", **block)
        self.feed_forward_block.build(inputs_shape)
        self.built = True

    def call(self, inputs, padding_mask=None, training=None):
        block = self.self_attention_block
        normed = block.normalize_input(inputs)
        attended = self.self_attention(normed, attention_mask=padding_mask, training=training)
        x = block(inputs, attended, training=training)
        block = self.feed_forward_block
        transformed = self.feed_forward(block.normalize_input(x), training=training)
        return block(x, transformed, training=training)

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            ffn_dim=self.ffn_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            norm_placement=self.norm_placement,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config
