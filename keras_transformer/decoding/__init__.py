"""Decoding: greedy and beam search over a `Transformer`, written with `keras.ops` loops."""

from keras_transformer.decoding.beam_search import beam_search
from keras_transformer.decoding.greedy import greedy_search, uncached_greedy_search

__all__ = ["beam_search", "greedy_search", "uncached_greedy_search"]
