"""What the encoder and decoder layers share: arguments, sub-layer blocks, feed-forward, config."""

import keras

from keras_transformer.layers.feed_forward import PositionwiseFeedForward
from keras_transformer.layers.multi_head_attention import MultiHeadAttention
from keras_transformer.layers.residual import ResidualBlock


class TransformerLayerBase(keras.layers.Layer):
    """Base of `TransformerEncoderLayer` and `TransformerDecoderLayer`.

    Each sub-layer (an attention or the feed-forward network) sits in a `ResidualBlock`; the
    subclasses create them in `build()` with `_attention_block` and `_feed_forward_block`, in
    the order of their computation (the order of the layer's weights).

    Args:
        num_heads: attention heads.
        ffn_dim: inner size of the feed-forward network.
        dropout: residual and feed-forward dropout.
        attention_dropout: dropout on attention weights.
        norm_placement: `"post"` (paper) or `"pre"`.
        layer_norm_epsilon: epsilon of the layer norms.
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
        if norm_placement not in ("post", "pre"):
            raise ValueError(f"norm_placement must be 'post' or 'pre', got {norm_placement!r}")
        self.num_heads = int(num_heads)
        self.ffn_dim = int(ffn_dim)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.norm_placement = norm_placement
        self.layer_norm_epsilon = float(layer_norm_epsilon)

    def _check_model_dim(self, inputs_shape):
        model_dim = inputs_shape[-1]
        if model_dim % self.num_heads:
            raise ValueError(
                f"model_dim ({model_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        self.model_dim = model_dim
        return model_dim

    def _residual_block(self, name, inputs_shape):
        block = ResidualBlock(
            norm_placement=self.norm_placement,
            epsilon=self.layer_norm_epsilon,
            dropout=self.dropout,
            dtype=self.dtype_policy,
            name=name,
        )
        block.build(inputs_shape)
        return block

    def _attention_block(self, name, inputs_shape, memory_shape=None):
        """`(attention, its residual block)`, built; `memory_shape` for cross-attention."""
        attention = MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=self.model_dim // self.num_heads,
            dropout=self.attention_dropout,
            dtype=self.dtype_policy,
            name=name,
        )
        attention.build(inputs_shape, memory_shape)
        return attention, self._residual_block(f"{name}_residual", inputs_shape)

    def _feed_forward_block(self, inputs_shape):
        """`(feed-forward network, its residual block)`, built."""
        feed_forward = PositionwiseFeedForward(
            self.ffn_dim, dropout=self.dropout, dtype=self.dtype_policy, name="feed_forward"
        )
        feed_forward.build(inputs_shape)
        return feed_forward, self._residual_block("feed_forward_residual", inputs_shape)

    def _attend(self, attention, block, x, training=None, **kwargs):
        """`x` through one attention sub-layer and its residual block: `(output, weights)`."""
        attended, weights = attention(
            block.normalize_input(x, training=training),
            return_attention_scores=True,
            training=training,
            **kwargs,
        )
        return block(x, attended, training=training), weights

    def _feed_forward(self, x, training=None):
        block = self.feed_forward_block
        transformed = self.feed_forward(
            block.normalize_input(x, training=training), training=training
        )
        return block(x, transformed, training=training)

    def compute_output_shape(self, inputs_shape, *args, **kwargs):
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
