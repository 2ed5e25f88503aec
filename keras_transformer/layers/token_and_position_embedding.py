"""Token embedding scaled by sqrt(d_model) plus sinusoidal positions (paper §3.4-3.5)."""

import math

import keras
import numpy as np
from keras import ops

from keras_transformer.layers.dropout import Dropout
from keras_transformer.layers.take_rows import take_rows


def sinusoidal_position_encoding(max_length: int, dim: int) -> np.ndarray:
    """The fixed encoding of §3.5 as a `[max_length, dim]` float32 array.

    `PE[pos, 2i] = sin(pos / 10000^(2i/dim))`, `PE[pos, 2i+1] = cos(pos / 10000^(2i/dim))`:
    sines and cosines interleaved exactly as the paper writes it.
    """
    positions = np.arange(max_length, dtype=np.float64)[:, None]
    inverse_frequencies = np.power(10000.0, -np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions * inverse_frequencies[None, :]
    encoding = np.zeros((max_length, dim), dtype=np.float64)
    encoding[:, 0::2] = np.sin(angles)
    encoding[:, 1::2] = np.cos(angles[:, : dim // 2])
    return encoding.astype("float32")


@keras.saving.register_keras_serializable(package="keras_transformer")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Embeds token ids, scales by sqrt(d_model), adds sinusoidal positions, applies dropout.

    The embedding matrix can also be used in reverse, as the pre-softmax projection
    (`reverse=True`), which is how §3.4 shares one matrix between the embeddings and the output
    layer: `logits = hidden @ E^T`.

    Args:
        vocab_size: number of token ids.
        embedding_dim: `d_model`.
        max_length: longest sequence the positional table covers.
        dropout: dropout rate applied to the sum (§5.4).
        pad_id: the padding id (kept in the config so callers build masks from it; masks are
            passed explicitly to the attention layers rather than through Keras' implicit
            masking, which would also attach a mask to the tied output projection).
        embeddings_initializer: initializer of the `[vocab_size, embedding_dim]` matrix. The
            default normal(0, d^-0.5) keeps `sqrt(d) * E` at unit scale and the tied
            projection's logits small at initialisation.

    Call arguments:
        inputs: int ids `[batch, length]` (or hidden states `[batch, length, embedding_dim]`
            with `reverse=True`; rank 3 exactly).
        start_index: position of the first token (an int or scalar tensor); incremental
            decoding passes the step index.
        reverse: project hidden states onto the vocabulary instead of embedding ids.
        training: enables dropout.

    Returns:
        `[batch, length, embedding_dim]`, or logits `[batch, length, vocab_size]` with
        `reverse=True`.

    Example:
    >>> layer = TokenAndPositionEmbedding(vocab_size=100, embedding_dim=16, max_length=32)
    >>> layer(np.array([[5, 6, 0]])).shape
    (1, 3, 16)
    """

    def __init__(
        self,
        vocab_size,
        embedding_dim,
        max_length,
        dropout=0.0,
        pad_id=0,
        embeddings_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.embedding_dim = int(embedding_dim)
        self.max_length = int(max_length)
        self.dropout = float(dropout)
        self.pad_id = int(pad_id)
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer
            or keras.initializers.RandomNormal(stddev=self.embedding_dim**-0.5)
        )
        self.scale = math.sqrt(self.embedding_dim)
        self.dropout_layer = Dropout(self.dropout, name="embedding_dropout")

    def build(self, inputs_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocab_size, self.embedding_dim),
            initializer=self.embeddings_initializer,
        )
        # A constant, not a weight: it is part of the architecture, not learned.
        self.position_encoding = ops.convert_to_tensor(
            sinusoidal_position_encoding(self.max_length, self.embedding_dim)
        )
        self.built = True

    def call(self, inputs, start_index=0, reverse=False, training=None):
        if reverse:
            embeddings = ops.cast(self.embeddings, inputs.dtype)
            # A tensordot is one 2-D matrix product, and so is each part of its gradient.
            # TensorFlow ran the einsum "btd,vd->btv" as batched products and its gradient as
            # one product per sentence plus a sum (about 1.5 s of a 4 s `small` training step
            # on this 2-core CPU); with "...", the gradient even built a
            # [batch, length, vocab, d_model] tensor. Decoding steps do not come here: they
            # use `Transformer.output_kernel()`, transposed once per search.
            return ops.tensordot(inputs, embeddings, axes=([2], [1]))
        ids = ops.cast(inputs, "int32")
        embedded = take_rows(self.embeddings, ids) * ops.cast(self.scale, self.compute_dtype)
        # A gather rather than a slice: JAX traces the functional graph with a symbolic length,
        # which `slice` cannot take as a size.
        positions = take_rows(self.position_encoding, ops.arange(ops.shape(ids)[1]) + start_index)
        embedded = embedded + ops.cast(positions, embedded.dtype)[None]
        return self.dropout_layer(embedded, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            embedding_dim=self.embedding_dim,
            max_length=self.max_length,
            dropout=self.dropout,
            pad_id=self.pad_id,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config
