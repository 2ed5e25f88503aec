"""Keras 3 layers of the Transformer, written with `keras.ops` (TensorFlow and JAX backends)."""

from keras_transformer.layers.decoder_layer import TransformerDecoderLayer
from keras_transformer.layers.dropout import Dropout
from keras_transformer.layers.encoder_layer import TransformerEncoderLayer
from keras_transformer.layers.feed_forward import PositionwiseFeedForward
from keras_transformer.layers.layer_norm import LayerNorm
from keras_transformer.layers.masks import padding_mask
from keras_transformer.layers.multi_head_attention import (
    HeadProjection,
    MultiHeadAttention,
    causal_mask,
)
from keras_transformer.layers.residual import ResidualBlock
from keras_transformer.layers.token_and_position_embedding import (
    TokenAndPositionEmbedding,
    sinusoidal_position_encoding,
)

__all__ = [
    "Dropout",
    "HeadProjection",
    "LayerNorm",
    "MultiHeadAttention",
    "PositionwiseFeedForward",
    "ResidualBlock",
    "TokenAndPositionEmbedding",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "causal_mask",
    "padding_mask",
    "sinusoidal_position_encoding",
]
