"""Multi-head scaled dot-product attention (§3.2) with a fixed-size cache for decoding."""

import keras
from keras import ops

from keras_transformer.layers.attention_cache import gather_ancestors, write_cache
from keras_transformer.layers.dropout import Dropout
from keras_transformer.layers.masks import masked_fill_value


@keras.saving.register_keras_serializable(package="keras_transformer")
class HeadProjection(keras.layers.EinsumDense):
    """An `EinsumDense` whose plain forward pass is one `ops.tensordot`.

    TensorFlow runs the `EinsumDense` equations of attention (`abc,cde->abde`,
    `abcd,cde->abe`) as broadcast batched matrix products, and their kernel gradient as one
    small product per batch entry plus a sum: in a training step of the `small` preset those
    took most of the time (about 35 ms each on a 2-core CPU). A tensordot is a single 2-D
    matrix product, and so is each part of its gradient; it was 2x faster for training.

    Everything else is `EinsumDense`'s: the same variables (`kernel`, `bias`, so checkpoints
    keep their layout), dtype policy (variables in the variable dtype, the product in the
    compute dtype), and with LoRA enabled or quantization (which Keras routes to
    `quantized_call`), `EinsumDense`'s own computation.

    Args:
        equation, output_shape, bias_axes, ...: as `keras.layers.EinsumDense`; the equation
            must contract the first axes of the kernel with the last axes of the input,
            in order (`abc,cde->abde`: 1 axis; `abcd,cde->abe`: 2).
    """

    def __init__(self, equation, output_shape, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self.contracted_axes = _contracted_axes(equation)

    def quantize(self, mode=None, type_check=True, config=None):
        # `EinsumDense` refuses to quantize subclasses, whose `call` may compute something
        # else; once quantized, Keras runs `EinsumDense.quantized_call`, never this `call`.
        return super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        if self.lora_enabled:
            # The reference computation for an adapted kernel; speed matters less there.
            return super().call(inputs, training=training)
        rank = len(inputs.shape)
        x = ops.tensordot(
            inputs,
            self.kernel,
            axes=(
                list(range(rank - self.contracted_axes, rank)),
                list(range(self.contracted_axes)),
            ),
        )
        if self.bias is not None:
            x = x + self.bias
        if self.activation is not None:
            x = self.activation(x)
        return x


def _contracted_axes(equation):
    """How many leading kernel axes an `EinsumDense` equation contracts with the input's last
    axes, in order (`abc,cde->abde`: 1; `abcd,cde->abe`: 2); a `ValueError` for other forms."""
    operands, output = equation.split("->")
    inputs, kernel = operands.split(",")
    for count in range(min(len(inputs), len(kernel)), 0, -1):
        if inputs[-count:] == kernel[:count] and not set(kernel[:count]) & set(output):
            return count
    raise ValueError(
        "HeadProjection needs an equation that contracts the kernel's first axes with the "
        f"input's last ones, in order; got {equation!r}"
    )


@keras.saving.register_keras_serializable(package="keras_transformer")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention, `softmax(Q K^T / sqrt(d_k)) V` over `num_heads` projections.

    One layer serves the three uses of the paper: encoder self-attention, causal decoder
    self-attention and encoder-decoder attention. Keys and values can be computed separately
    (`compute_key_value`) so that a decoder computes the encoder-decoder keys/values once per
    source sentence, and decoder self-attention can write into a preallocated
    `[batch, num_heads, beams * max_length, head_dim]` cache (`call_cached`, layout in
    `attention_cache`) instead of concatenating a growing tensor each step: shapes stay fixed,
    so a compiled decoding loop is traced once.

    The four projections are `HeadProjection` sublayers (`EinsumDense` with a tensordot forward
    pass) and are always called as layers, so the dtype policy, LoRA and quantization apply.

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
        return_attention_scores: also return the attention weights.
        training: enables attention dropout.

    Returns:
        `[batch, query_length, model_dim]`, or with `return_attention_scores=True` a tuple
        `(output, weights)`, `weights` `[batch, num_heads, query_length, key_length]`: the
        softmax probabilities used (after dropout when training), 0 at masked keys, each row
        summing to 1 over the keys it may attend to (as `keras.layers.MultiHeadAttention`).

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
        return HeadProjection(
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
        # Projections keep heads as their own axis: [batch, length, heads, head_dim]. The
        # attribute names are the checkpoints' paths of these weights.
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
        self.dropout_layer = Dropout(self.dropout, name="attention_dropout")
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
            `(output [batch, query_length, model_dim], weights [batch, heads, query_length,
            key_length])`, the output after the output projection.
        """
        context, weights = self._attention(query, key, value, attention_mask, training)
        return self.output_dense(_heads_first(context)), weights

    def attend_rows(self, query, key, value, attention_mask=None):
        """Attention for a decoding step: a few query rows per sentence (its beams).

        Args:
            query: `[batch, rows, model_dim]` (not yet projected), `rows` = the sentence's
                beams.
            key, value: `[batch, heads, key_length, head_dim]`, already projected (a cache, or
                the encoder-decoder keys/values).
            attention_mask: boolean broadcastable to `[batch, rows, heads, key_length]`.

        Returns:
            `[batch, rows, model_dim]` after the output projection.

        The projections keep their natural `[batch, rows, heads, head_dim]` layout (no
        transposes, which were a tenth of a beam step's time), and the products run row by
        row (see `_rowwise_products`).
        """
        return self.attend_projected_rows(self.query_dense(query), key, value, attention_mask)

    def attend_projected_rows(self, query, key, value, attention_mask=None, step_weights=None):
        """`attend_rows` for a query already projected to `[batch, rows, heads, head_dim]`.

        With `step_weights` (`self.step_weights()`), the output projection is a 2-D product
        of weights read once per search, and the result is `[batch * rows, model_dim]`.
        """
        context, _ = self._attention(query, key, value, attention_mask, rows=True)
        if step_weights is None:
            return self.output_dense(context)
        return _matmul_2d(context, step_weights["output"], self.num_heads * self.key_dim)

    def step_weights(self):
        """The query and output projections as 2-D matrices for decoding steps:
        `{"query": (kernel [d, h * d_k], bias), "output": (kernel [h * d_k, d], bias)}`.

        A search prepares them once (`Transformer.init_decoder_state`): inside its loop, a
        projection layer would read its variables and reshape around a tensordot at every
        step, a dozen small ops each, which at batch 1 cost about as much as the product.
        The products are the ones the tensordot runs (the same 2-D matrices), so outputs are
        unchanged. `None` when a projection has LoRA enabled or is quantized.
        """
        layers = (self.query_dense, self.output_dense)
        if any(p.lora_enabled or p.quantization_mode is not None for p in layers):
            return None
        width = self.num_heads * self.key_dim
        return {
            "query": _dense_matrices(self.query_dense, (-1, width)),
            "output": _dense_matrices(self.output_dense, (width, -1)),
        }

    def query_rows(self, query, step_weights):
        """`query [rows, model_dim]` projected with `step_weights()` to `[rows, heads, d_k]`."""
        projected = _matmul_2d(query, step_weights["query"], query.shape[-1])
        return ops.reshape(projected, (-1, self.num_heads, self.key_dim))

    def _attention(self, query, key, value, attention_mask, training=None, rows=False):
        """The attention core every path shares: scale, scores, mask, softmax, dropout, context.

        `rows=False`: `query [b, h, q, d]`, result `(context [b, h, q, d], weights [b, h, q, k])`.
        `rows=True`: `query [b, q, h, d]` (a decoding step's rows), result
        `(context [b, q, h, d], weights [b, q, h, k])`, products by `_rowwise_products`.
        `key`, `value`: `[b, h, k, d]`, or with `rows=True` also `[b, q, h, k, d]` (each row's
        own keys, see `call_cached`); `attention_mask` broadcastable to the weights.
        """
        query = query * ops.cast(self.key_dim**-0.5, query.dtype)
        if rows:
            scores = _rowwise_products(query, key, transpose=True)
        else:
            scores = ops.einsum("bhqd,bhkd->bhqk", query, key)
        if attention_mask is not None:
            scores = ops.where(attention_mask, scores, masked_fill_value(scores.dtype))
        # Softmax in float32: under mixed precision the row sums lose digits in bf16.
        weights = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), value.dtype)
        weights = self.dropout_layer(weights, training=training)
        if rows:
            return _rowwise_products(weights, value, transpose=False), weights
        return ops.einsum("bhqk,bhkd->bhqd", weights, value), weights

    def call(
        self,
        query,
        value=None,
        attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
    ):
        value = query if value is None else value
        key, value_heads = self.compute_key_value(value)
        mask = _expand_mask(attention_mask)
        if use_causal_mask:
            causal = causal_mask(ops.shape(query)[1], ops.shape(value)[1])[None, None]
            mask = causal if mask is None else ops.logical_and(mask, causal)
        output, weights = self.attend(
            self.compute_query(query), key, value_heads, mask, training=training
        )
        if return_attention_scores:
            return output, weights
        return output

    def call_cached(
        self,
        query,
        key_cache,
        value_cache,
        cache_index,
        attention_mask,
        beams=1,
        qkv=None,
        in_place=False,
        row_offsets=None,
        step_weights=None,
        ancestor_rows=None,
    ):
        """Causal self-attention for one decoding step, writing into a preallocated cache.

        See `attention_cache` for the layout and why beams are never reordered in it.

        Args:
            query: `[batch * beams, 1, model_dim]`, the step's hidden states, rows grouped by
                sentence (row `i * beams + k` is slot `k` of sentence `i`).
            key_cache, value_cache: `[batch, heads, beams * max_length, head_dim]`.
            cache_index: scalar int, this token's position.
            attention_mask: from `attention_cache.cache_attention_mask` for this step (the
                same for every layer, so the caller builds it once).
            beams: slots per sentence (a Python int).
            ancestor_rows: required when `beams > 1`: `attention_cache.ancestor_rows` of the
                search's ancestry; each hypothesis attends to its ancestors' rows only.
            qkv: `stacked_query_key_value()`, prepared once per search; `None` calls the
                three projections.
            in_place: write the caches in their own buffers (`attention_cache.write_cache`);
                by default the caches given are left unchanged.
            row_offsets: `attention_cache.cache_row_offsets` for the caches, prepared once
                per search; `None` computes them.
            step_weights: `step_weights()`, prepared once per search; `None` calls the
                output projection layer.

        Returns:
            `(output [batch * beams, 1, model_dim], key_cache, value_cache)` with this step
            written.
        """
        model_dim = ops.shape(query)[-1]
        if qkv is None:
            qkv = self.stacked_query_key_value()
        if qkv is None:
            step_query = self.query_dense(query)
            step_key, step_value = self.key_dense(query), self.value_dense(query)
        else:
            # One [rows, d] x [d, 3 * heads * head_dim] product for the three projections.
            kernel, bias = ops.cast(qkv[0], query.dtype), ops.cast(qkv[1], query.dtype)
            projected = ops.matmul(ops.reshape(query, (-1, model_dim)), kernel) + bias
            projected = ops.reshape(projected, (-1, 3, self.num_heads, self.key_dim))
            step_query, step_key, step_value = projected[:, 0], projected[:, 1], projected[:, 2]
        # Keys/values: the rows of (sentence, slot, head) in order.
        key_cache = write_cache(key_cache, step_key, cache_index, beams, in_place, row_offsets)
        value_cache = write_cache(
            value_cache, step_value, cache_index, beams, in_place, row_offsets
        )
        rows = ops.reshape(step_query, (-1, beams, self.num_heads, self.key_dim))
        keys, values = key_cache, value_cache
        if beams > 1:
            if ancestor_rows is None:
                raise ValueError(f"beams={beams} needs ancestor_rows (the beams' ancestry)")
            # [batch, beams, heads, max_length, head_dim]: each hypothesis' own history.
            keys = gather_ancestors(key_cache, ancestor_rows)
            values = gather_ancestors(value_cache, ancestor_rows)
        output = self.attend_projected_rows(rows, keys, values, attention_mask, step_weights)
        return ops.reshape(output, (-1, 1, model_dim)), key_cache, value_cache

    def stacked_query_key_value(self):
        """The query, key and value projections side by side: `(kernel [d, 3 * h * d_k],
        bias [3 * h * d_k])`, for decoding steps (`call_cached(..., qkv=...)`), which
        prepare it once per search.

        `None` when a projection has LoRA enabled or is quantized: its kernel is then not a
        plain variable, and the step calls the projections themselves.
        """
        projections = (self.query_dense, self.key_dense, self.value_dense)
        if any(p.lora_enabled or p.quantization_mode is not None for p in projections):
            return None
        kernels = [
            ops.reshape(layer.kernel, (ops.shape(layer.kernel)[0], -1)) for layer in projections
        ]
        width = self.num_heads * self.key_dim
        biases = [
            ops.reshape(layer.bias, (-1,)) if self.use_bias else ops.zeros((width,))
            for layer in projections
        ]
        kernel = ops.concatenate(kernels, axis=1)
        return kernel, ops.cast(ops.concatenate(biases, axis=0), kernel.dtype)

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


def _dense_matrices(layer, kernel_shape):
    """`(kernel, bias)` of a projection as a 2-D matrix and a vector (bias `None` if none)."""
    kernel = ops.reshape(ops.convert_to_tensor(layer.kernel), kernel_shape)
    bias = None if layer.bias is None else ops.reshape(ops.convert_to_tensor(layer.bias), (-1,))
    return kernel, bias


def _matmul_2d(x, weights, width):
    """`x [..., width]` times a `(kernel, bias)` pair, as one 2-D product: `[rows, out]`."""
    kernel, bias = weights
    x = ops.reshape(x, (-1, width))
    y = ops.matmul(x, ops.cast(kernel, x.dtype))
    return y if bias is None else y + ops.cast(bias, x.dtype)


def _rowwise_products(rows, matrix, transpose):
    """`rows [b, q, h, n] x matrix [b, h, k, n]^T -> [b, q, h, k]` (`transpose=True`), or
    `rows [b, q, h, k] x matrix [b, h, k, n] -> [b, q, h, n]`, one query row at a time.
    `matrix` may also be `[b, q, h, k, n]`, a matrix per row (a hypothesis' own history).

    On TensorFlow each (sentence, row, head) becomes a batch entry of a matrix-vector product
    with `matrix` broadcast to it: for a decoding step's shapes that was 4-12x faster than the
    batched `[q, n] x [n, k]` products of an einsum without oneDNN (0.21 vs 2.5 ms for
    `[128] x [4, 64] x [64, 128]`). Other backends get the einsum, which XLA compiles without
    broadcasting `matrix`.
    """
    per_row = len(matrix.shape) == 5
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        matrix = matrix if per_row else matrix[:, None]
        product = tf.matmul(rows[:, :, :, None, :], matrix, transpose_b=transpose)
        return product[:, :, :, 0, :]
    matrix_axes = "bqhkn" if per_row else "bhkn"
    if transpose:
        return ops.einsum(f"bqhn,{matrix_axes}->bqhk", rows, matrix)
    return ops.einsum(f"bqhk,{matrix_axes}->bqhn", rows, matrix)


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
