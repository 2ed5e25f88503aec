"""Multi-head scaled dot-product attention (§3.2) with a fixed-size cache for decoding."""

import keras
from keras import ops

from keras_transformer.layers.masks import masked_fill_value


@keras.saving.register_keras_serializable(package="keras_transformer")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention, `softmax(Q K^T / sqrt(d_k)) V` over `num_heads` projections.

    One layer serves the three uses of the paper: encoder self-attention, causal decoder
    self-attention and encoder-decoder attention. Keys and values can be computed separately
    (`compute_key_value`) so that a decoder computes the encoder-decoder keys/values once per
    source sentence, and decoder self-attention can write into a preallocated
    `[batch, num_heads, max_length, head_dim]` cache (`call_cached`) instead of concatenating
    a growing tensor each step: shapes stay fixed, so a compiled decoding loop is traced once.

    Args:
        num_heads: number of heads `h`.
        key_dim: size of each head `d_k = d_v`.
        dropout: dropout on the attention weights.
        use_bias: whether the four projections have biases.
        kernel_initializer: initializer of the projection kernels.

    Call arguments:
        query: `[batch, query_length, model_dim]`.
        value: `[batch, key_length, model_dim]`; defaults to `query` (self-attention).
        attention_mask: boolean, broadcastable to `[batch, query_length, key_length]`; `True`
            means "may attend". A `[batch, key_length]` padding mask is accepted and broadcast.
        use_causal_mask: additionally forbid attending to later positions.
        training: enables attention dropout.

    Returns:
        `[batch, query_length, model_dim]`.

    Example:
    >>> attention = MultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = np.random.rand(1, 5, 16).astype("float32")
    >>> attention(x, use_causal_mask=True).shape
    (1, 5, 16)

    References:
        Vaswani et al., "Attention Is All You Need", 2017, §3.2.
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        dropout=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.key_dim = int(key_dim)
        self.dropout = float(dropout)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def _projection(self, name, equation, output_shape, bias_axes):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes if self.use_bias else None,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, query_shape, value_shape=None):
        value_shape = query_shape if value_shape is None else value_shape
        model_dim = query_shape[-1]
        heads = (self.num_heads, self.key_dim)
        # Projections keep heads as their own axis: [batch, length, heads, head_dim].
        self.query_dense = self._projection("query", "abc,cde->abde", (None, *heads), "de")
        self.key_dense = self._projection("key", "abc,cde->abde", (None, *heads), "de")
        self.value_dense = self._projection("value", "abc,cde->abde", (None, *heads), "de")
        self.output_dense = self._projection(
            "attention_output", "abcd,cde->abe", (None, model_dim), "e"
        )
        self.query_dense.build(query_shape)
        self.key_dense.build(value_shape)
        self.value_dense.build(value_shape)
        self.output_dense.build((query_shape[0], query_shape[1], self.num_heads, self.key_dim))
        self.dropout_layer = keras.layers.Dropout(self.dropout, name="attention_dropout")
        self.built = True

    # -- pieces, used by the cached decoder ----------------------------------------------
    def compute_key_value(self, value):
        """Projects `value` `[batch, length, model_dim]` to keys, values `[batch, h, length, d]`.

        Heads come before positions so that both attention products are plain batched
        matrix products over `[batch, heads]`: with a `[batch, length, heads, d]` layout every
        decoding step would transpose the whole key/value cache.
        """
        return _heads_first(self.key_dense(value)), _heads_first(self.value_dense(value))

    def compute_query(self, query):
        """Projects `query` `[batch, length, model_dim]` to `[batch, heads, length, head_dim]`."""
        return _heads_first(self.query_dense(query))

    def attend(self, query, key, value, attention_mask=None, training=None):
        """Attention of projected heads.

        Args:
            query: `[batch, heads, query_length, head_dim]`, already projected.
            key, value: `[batch, heads, key_length, head_dim]`, already projected.
            attention_mask: boolean broadcastable to `[batch, heads, query_length, key_length]`.

        Returns:
            `[batch, query_length, model_dim]` after the output projection.
        """
        query = query * ops.cast(self.key_dim**-0.5, query.dtype)
        scores = ops.einsum("bhqd,bhkd->bhqk", query, key)
        if attention_mask is not None:
            scores = ops.where(attention_mask, scores, masked_fill_value(scores.dtype))
        # Softmax in float32: under mixed precision the row sums lose digits in bf16.
        weights = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), value.dtype)
        weights = self.dropout_layer(weights, training=training)
        context = ops.einsum("bhqk,bhkd->bhqd", weights, value)
        return self.output_dense(_heads_first(context))

    def call(self, query, value=None, attention_mask=None, use_causal_mask=False, training=None):
        value = query if value is None else value
        key, value_heads = self.compute_key_value(value)
        mask = _expand_mask(attention_mask)
        if use_causal_mask:
            causal = causal_mask(ops.shape(query)[1], ops.shape(value)[1])[None, None]
            mask = causal if mask is None else ops.logical_and(mask, causal)
        return self.attend(self.compute_query(query), key, value_heads, mask, training=training)

    def call_cached(self, query, key_cache, value_cache, cache_index, attention_mask=None):
        """Causal self-attention for one decoding step, writing into a preallocated cache.

        Args:
            query: `[batch, 1, model_dim]`, the step's hidden state.
            key_cache, value_cache: `[batch, heads, max_length, head_dim]`, positions
                `< cache_index` already filled.
            cache_index: scalar int, this token's position.
            attention_mask: optional boolean `[batch, max_length]` of cache positions that may
                be attended to (e.g. forced-padding positions); causality is added here.

        Returns:
            `(output [batch, 1, model_dim], key_cache, value_cache)` with this step written.
        """
        key, value = self.compute_key_value(query)
        key_cache = write_cache(key_cache, ops.cast(key, key_cache.dtype), cache_index)
        value_cache = write_cache(value_cache, ops.cast(value, value_cache.dtype), cache_index)
        positions = ops.arange(ops.shape(key_cache)[2])
        mask = ops.less_equal(positions, cache_index)[None, None, None, :]
        if attention_mask is not None:
            mask = ops.logical_and(mask, _expand_mask(attention_mask))
        output = self.attend(self.compute_query(query), key_cache, value_cache, mask)
        return output, key_cache, value_cache

    def compute_output_shape(self, query_shape, value_shape=None):
        return query_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


def write_cache(cache, update, index):
    """Writes `update` `[batch, heads, 1, head_dim]` at position `index` of `cache`.

    `ops.slice_update` is the natural op (JAX: `dynamic_update_slice`), but on TensorFlow it
    lowers to `XlaDynamicUpdateSlice`, an XLA op that a stock `tensorflow_model_server` runs only
    with XLA enabled. There a scatter of one `head_dim` row per sentence and head (core
    `TensorScatterUpdate`) does the same write.
    """
    if keras.config.backend() == "tensorflow":
        batch, heads = ops.shape(cache)[0], ops.shape(cache)[1]
        rows = ops.repeat(ops.arange(batch, dtype="int32"), heads)
        head_ids = ops.tile(ops.arange(heads, dtype="int32"), [batch])
        positions = ops.zeros_like(rows) + ops.cast(index, "int32")
        indices = ops.stack([rows, head_ids, positions], axis=1)
        return ops.scatter_update(cache, indices, ops.reshape(update, (-1, ops.shape(update)[-1])))
    return ops.slice_update(cache, (0, 0, index, 0), update)


def _heads_first(x):
    """`[batch, length, heads, d]` <-> `[batch, heads, length, d]` (the swap is its own inverse)."""
    return ops.transpose(x, (0, 2, 1, 3))


def causal_mask(query_length, key_length):
    """Boolean `[query_length, key_length]`; query i sees keys `<= i + key_len - query_len`."""
    rows = ops.arange(query_length)[:, None] + (key_length - query_length)
    return ops.greater_equal(rows, ops.arange(key_length)[None, :])


def _expand_mask(mask):
    """Broadcasts a mask to `[batch, heads, query, key]` rank: `[b, k]` and `[b, q, k]` accepted."""
    if mask is None:
        return None
    mask = ops.cast(mask, "bool")
    rank = len(mask.shape)
    if rank == 2:
        return mask[:, None, None, :]
    if rank == 3:
        return mask[:, None, :, :]
    return mask
