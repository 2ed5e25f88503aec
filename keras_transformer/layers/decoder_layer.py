"""One decoder layer: causal self-attention, encoder-decoder attention, feed-forward (§3.1)."""

import keras
from keras import ops

from keras_transformer.layers.attention_cache import empty_cache
from keras_transformer.layers.transformer_layer import TransformerLayerBase


@keras.saving.register_keras_serializable(package="keras_transformer")
class TransformerDecoderLayer(TransformerLayerBase):
    """Causal self-attention, attention over the encoder output, then a feed-forward network.

    Two ways to run it:

    - `call` for training and scoring: the whole target at once, with a causal mask.
    - `call_step` for incremental decoding: one position per call, self-attention keys and
      values written into a preallocated cache, and encoder-decoder keys/values computed once
      per source sentence by `compute_cross_key_value`. With beam search, the step's rows are
      `[batch * beams]` while the encoder keys/values stay `[batch]`: the beams of a sentence
      become that sentence's query positions, so nothing is tiled per beam.

    Args: those of `TransformerLayerBase` (`num_heads`, `ffn_dim`, `dropout`,
        `attention_dropout`, `norm_placement`, `layer_norm_epsilon`).

    Call arguments:
        inputs: target states `[batch, target_length, model_dim]`.
        memory: encoder output `[batch, source_length, model_dim]`.
        target_padding_mask: optional boolean `[batch, target_length]`; padded target keys
            get no weight (causality already hides right padding; this matters for left padding).
        memory_padding_mask: boolean `[batch, source_length]`, `False` at source padding.
        return_attention_scores: also return the attention weights.
        training: enables dropout.

    Returns:
        `[batch, target_length, model_dim]`; with `return_attention_scores=True`,
        `(outputs, self_weights [batch, num_heads, target_length, target_length],
        cross_weights [batch, num_heads, target_length, source_length])`.
    """

    def build(self, inputs_shape, memory_shape=None):
        memory_shape = inputs_shape if memory_shape is None else memory_shape
        self._check_model_dim(inputs_shape)
        self.self_attention, self.self_attention_block = self._attention_block(
            "self_attention", inputs_shape
        )
        self.cross_attention, self.cross_attention_block = self._attention_block(
            "cross_attention", inputs_shape, memory_shape
        )
        self.feed_forward, self.feed_forward_block = self._feed_forward_block(inputs_shape)
        self.built = True

    def call(
        self,
        inputs,
        memory,
        target_padding_mask=None,
        memory_padding_mask=None,
        return_attention_scores=False,
        training=None,
    ):
        x, self_weights = self._attend(
            self.self_attention,
            self.self_attention_block,
            inputs,
            attention_mask=target_padding_mask,
            use_causal_mask=True,
            training=training,
        )
        x, cross_weights = self._attend(
            self.cross_attention,
            self.cross_attention_block,
            x,
            value=memory,
            attention_mask=memory_padding_mask,
            training=training,
        )
        x = self._feed_forward(x, training=training)
        return (x, self_weights, cross_weights) if return_attention_scores else x

    # -- incremental decoding ------------------------------------------------------------
    def compute_cross_key_value(self, memory):
        """Encoder-decoder keys/values `[batch, heads, source_length, head_dim]`, per source."""
        return self.cross_attention.compute_key_value(memory)

    def init_cache(self, batch_size, max_length, beams=1, dtype=None, in_place=False):
        """Zero `(key_cache, value_cache)`, each `[batch_size, heads, beams * max_length, d]`.

        `batch_size` counts sentences; see `attention_cache` for the layout, and
        `attention_cache.empty_cache` for `in_place`.
        """
        dtype = dtype or self.compute_dtype
        args = (batch_size, self.num_heads, max_length, self.model_dim // self.num_heads, beams)
        return (
            empty_cache(*args, dtype=dtype, in_place=in_place),
            empty_cache(*args, dtype=dtype, in_place=in_place),
        )

    def call_step(
        self,
        inputs,
        key_cache,
        value_cache,
        cache_index,
        cache_mask,
        cross_key,
        cross_value,
        memory_padding_mask=None,
        beams=1,
        qkv=None,
        in_place=False,
        row_offsets=None,
        step_weights=None,
        ancestor_rows=None,
    ):
        """Decodes one position.

        Args:
            inputs: `[batch * beams, 1, model_dim]`, rows grouped by sentence
                (row `i * beams + k` is beam slot `k` of sentence `i`).
            key_cache, value_cache: `[batch, heads, beams * max_length, head_dim]`.
            cache_index: scalar int, the position being decoded.
            cache_mask: the cache positions this step may attend to, from
                `attention_cache.cache_attention_mask`, or `None` when `ancestor_rows` hold
                the decoded positions only.
            cross_key, cross_value: `[batch, heads, source_length, head_dim]` from
                `compute_cross_key_value`, shared by the beams of a sentence.
            memory_padding_mask: boolean `[batch, source_length]`.
            beams: beams per sentence (a Python int).
            qkv: `self_attention.stacked_query_key_value()`, prepared once per search
                (computed here when `None`).
            in_place: write the caches in their own buffers (see
                `attention_cache.write_cache`); by default the caches given are unchanged.
            row_offsets: `attention_cache.cache_row_offsets` for the caches, prepared once per
                search (computed here when `None`).
            step_weights: `self.step_weights()`, prepared once per search; `None` calls the
                layers.
            ancestor_rows: with `beams > 1`, `attention_cache.ancestor_rows` of the search's
                ancestry, computed once per step for every layer.

        Returns:
            `(outputs [batch * beams, 1, model_dim], key_cache, value_cache)`.
        """
        block = self.self_attention_block
        attended, key_cache, value_cache = self.self_attention.call_cached(
            block.normalize_input(inputs),
            key_cache,
            value_cache,
            cache_index,
            cache_mask,
            beams,
            qkv=qkv,
            in_place=in_place,
            row_offsets=row_offsets,
            step_weights=None if step_weights is None else step_weights["self_attention"],
            ancestor_rows=ancestor_rows,
        )
        x = block(inputs, attended)
        block = self.cross_attention_block
        mask = None if memory_padding_mask is None else memory_padding_mask[:, None, None, :]
        if step_weights is None or step_weights["cross_attention"] is None:
            # [batch * beams, 1, d] -> [batch, beams, d]: the beams act as query positions.
            query = ops.reshape(block.normalize_input(x), (-1, beams, self.model_dim))
            attended = self.cross_attention.attend_rows(query, cross_key, cross_value, mask)
        else:
            weights = step_weights["cross_attention"]
            attention = self.cross_attention
            query = attention.query_rows(block.normalize_input(x), weights)
            query = ops.reshape(query, (-1, beams, attention.num_heads, attention.key_dim))
            attended = attention.attend_projected_rows(query, cross_key, cross_value, mask, weights)
        x = block(x, ops.reshape(attended, (-1, 1, self.model_dim)))
        if step_weights is None or step_weights["feed_forward"] is None:
            return self._feed_forward(x), key_cache, value_cache
        block = self.feed_forward_block
        rows = ops.reshape(block.normalize_input(x), (-1, self.model_dim))
        transformed = self.feed_forward.call_rows(rows, step_weights["feed_forward"])
        return block(x, ops.reshape(transformed, (-1, 1, self.model_dim))), key_cache, value_cache

    def step_weights(self):
        """The sub-layers' weights laid out for decoding steps, read once per search: the
        self- and cross-attention projections and the feed-forward network (each `None`
        where LoRA or quantization keeps the layer's own computation)."""
        return {
            "self_attention": self.self_attention.step_weights(),
            "cross_attention": self.cross_attention.step_weights(),
            "feed_forward": self.feed_forward.step_weights(),
        }
