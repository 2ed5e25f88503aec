"""keras-transformer: the Transformer of "Attention Is All You Need" as Keras 3 layers and model."""

from keras_transformer.config import TransformerConfig
from keras_transformer.decoding import beam_search, greedy_search, uncached_greedy_search
from keras_transformer.layers import (
    MultiHeadAttention,
    PositionwiseFeedForward,
    TokenAndPositionEmbedding,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)
from keras_transformer.losses import MaskedLabelSmoothingLoss, MaskedTokenAccuracy
from keras_transformer.model import Transformer, build_transformer
from keras_transformer.schedules import TransformerSchedule, transformer_optimizer

__version__ = "0.1.0"

__all__ = [
    "MaskedLabelSmoothingLoss",
    "MaskedTokenAccuracy",
    "MultiHeadAttention",
    "PositionwiseFeedForward",
    "TokenAndPositionEmbedding",
    "Transformer",
    "TransformerConfig",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "TransformerSchedule",
    "beam_search",
    "build_transformer",
    "greedy_search",
    "transformer_optimizer",
    "uncached_greedy_search",
]
