"""The encoder-decoder as a functional Keras model, plus the pieces incremental decoding needs."""

from __future__ import annotations

import keras
from keras import ops

from keras_transformer.config import TransformerConfig
from keras_transformer.layers import cache_writes_tf
from keras_transformer.layers.attention_cache import (
    ancestor_row_offsets,
    ancestor_rows,
    cache_attention_mask,
    cache_row_offsets,
    initial_ancestry,
)
from keras_transformer.layers.decoder_layer import TransformerDecoderLayer
from keras_transformer.layers.encoder_layer import TransformerEncoderLayer
from keras_transformer.layers.masks import padding_mask
from keras_transformer.layers.token_and_position_embedding import TokenAndPositionEmbedding


@keras.saving.register_keras_serializable(package="keras_transformer")
class Transformer(keras.Model):
    """The Transformer of Vaswani et al. (2017) as a functional model.

    Inputs are `source_ids` and `target_ids`, int32 `[batch, length]` with 0 as padding
    (`target_ids` starts with `bos_id`: it is the decoder input, shifted right). The output is
    float32 logits `[batch, target_length, target_vocab_size]`. Because the model is functional,
    `model.fit`, `model.summary()`, `keras.saving` and the JAX backend work as with any Keras
    model; `get_config()` holds the `TransformerConfig`, so a `.keras` file rebuilds exactly.

    Besides the training graph, the model exposes the steps of incremental decoding
    (`encode`, `init_decoder_state`, `decode_step`) that share its layers and weights.

    Args:
        config: a `TransformerConfig` (or its dict).

    Example:
    >>> model = Transformer(TransformerConfig.preset("tiny"))
    >>> logits = model({"source_ids": source_ids, "target_ids": target_ids})
    """

    def __init__(self, config: TransformerConfig | dict, **kwargs):
        if isinstance(config, dict):
            config = TransformerConfig.from_dict(config)
        c = config
        source_ids = keras.Input(shape=(None,), dtype="int32", name="source_ids")
        target_ids = keras.Input(shape=(None,), dtype="int32", name="target_ids")

        embedding = dict(max_length=c.max_length, dropout=c.dropout, pad_id=c.pad_id)
        if c.share_embeddings:
            source_embedding = TokenAndPositionEmbedding(
                c.vocab_size, c.d_model, name="token_embedding", **embedding
            )
            target_embedding = source_embedding
            output_projection = None
        else:
            source_embedding = TokenAndPositionEmbedding(
                c.vocab_size, c.d_model, name="source_embedding", **embedding
            )
            target_embedding = TokenAndPositionEmbedding(
                c.resolved_target_vocab_size, c.d_model, name="target_embedding", **embedding
            )
            output_projection = keras.layers.Dense(
                c.resolved_target_vocab_size, use_bias=False, name="output_projection"
            )
        layer_args = dict(
            num_heads=c.num_heads,
            ffn_dim=c.ffn_dim,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            norm_placement=c.norm_placement,
            layer_norm_epsilon=c.layer_norm_epsilon,
        )
        encoder_layers = [
            TransformerEncoderLayer(name=f"encoder_layer_{i}", **layer_args)
            for i in range(c.num_encoder_layers)
        ]
        decoder_layers = [
            TransformerDecoderLayer(name=f"decoder_layer_{i}", **layer_args)
            for i in range(c.num_decoder_layers)
        ]
        # Pre-norm leaves the residual stream unnormalized; each stack ends with a layer norm.
        pre_norm = c.norm_placement == "pre"
        final_norm = dict(epsilon=c.layer_norm_epsilon)
        encoder_norm = (
            keras.layers.LayerNormalization(name="encoder_final_norm", **final_norm)
            if pre_norm
            else None
        )
        decoder_norm = (
            keras.layers.LayerNormalization(name="decoder_final_norm", **final_norm)
            if pre_norm
            else None
        )

        # The training graph runs the same code as `encode` and `decode`.
        memory, source_mask = run_encoder(
            source_ids, source_embedding, encoder_layers, encoder_norm, c.pad_id
        )
        hidden = run_decoder(target_ids, memory, source_mask, target_embedding, decoder_layers)
        logits = _output_logits(hidden, decoder_norm, target_embedding, output_projection)

        super().__init__(
            inputs={"source_ids": source_ids, "target_ids": target_ids},
            outputs=logits,
            **kwargs,
        )
        self.config = c
        self.source_embedding = source_embedding
        self.target_embedding = target_embedding
        self.output_projection = output_projection
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_norm = encoder_norm
        self.decoder_norm = decoder_norm

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- incremental decoding ----------------------------------------------------------------
    def encode(self, source_ids, training=False):
        """Runs the encoder.

        Args:
            source_ids: int `[batch, source_length]`, 0 = padding.

        Returns:
            `(memory [batch, source_length, d_model], source_mask bool [batch, source_length])`.
        """
        return self._run_encoder(source_ids, training)

    def _run_encoder(self, source_ids, training, attention_weights=None):
        return run_encoder(
            ops.cast(source_ids, "int32"),
            self.source_embedding,
            self.encoder_layers,
            self.encoder_norm,
            self.config.pad_id,
            training=training,
            attention_weights=attention_weights,
        )

    def project(self, hidden):
        """Final norm (pre-norm only) and pre-softmax projection: float32 logits."""
        return _output_logits(
            hidden, self.decoder_norm, self.target_embedding, self.output_projection
        )

    def output_kernel(self):
        """The pre-softmax projection as a `[d_model, vocab]` matrix.

        With shared embeddings this is `E^T`, materialised: decoding transposes it once per
        search rather than contracting against `E` at every step (a transposed matrix
        product was half as fast for the `[rows, d] x [d, vocab]` shape of a step).
        """
        if self.output_projection is None:
            return ops.transpose(self.target_embedding.embeddings)
        return ops.convert_to_tensor(self.output_projection.kernel)

    def decode(self, target_ids, memory, source_mask, training=False):
        """Full (uncached) decoder pass: logits `[batch, target_length, vocab]`."""
        return self.project(self._run_decoder(target_ids, memory, source_mask, training))

    def _run_decoder(self, target_ids, memory, source_mask, training, **attention_weights):
        return run_decoder(
            ops.cast(target_ids, "int32"),
            memory,
            source_mask,
            self.target_embedding,
            self.decoder_layers,
            training=training,
            **attention_weights,
        )

    def attention_weights(self, source_ids, target_ids):
        """Every layer's attention weights for a batch of sentence pairs (inference mode).

        Args:
            source_ids: int `[batch, source_length]`, 0 = padding.
            target_ids: int `[batch, target_length]`, the decoder input (bos first).

        Returns:
            A dict of lists over layers, bottom first, of float weights (softmax
            probabilities: each row sums to 1 over the keys it may attend to, 0 at masked keys):
            `"encoder_self_attention"`: `[batch, num_heads, source_length, source_length]`;
            `"decoder_self_attention"`: `[batch, num_heads, target_length, target_length]`
            (0 above the diagonal: causal);
            `"cross_attention"`: `[batch, num_heads, target_length, source_length]`.
        """
        weights = {
            "encoder_self_attention": [],
            "decoder_self_attention": [],
            "cross_attention": [],
        }
        memory, source_mask = self._run_encoder(
            source_ids, False, attention_weights=weights["encoder_self_attention"]
        )
        self._run_decoder(
            target_ids,
            memory,
            source_mask,
            False,
            self_attention_weights=weights["decoder_self_attention"],
            cross_attention_weights=weights["cross_attention"],
        )
        return weights

    def init_decoder_state(self, memory, source_mask, max_length, beams=1, in_place=False):
        """Everything `decode_step` reads: caches, beam ancestry, encoder-decoder keys/values.

        Args:
            memory: encoder output `[batch, source_length, d_model]`.
            source_mask: `[batch, source_length]`.
            max_length: number of target positions the caches hold: a Python int, or a
                scalar tensor (a length computed inside `tf.function`) that the caller keeps
                within `config.max_length`; only a Python int can be checked here.
            beams: hypotheses per sentence. The caches hold `beams` slots per sentence
                (`attention_cache` explains the layout) while the encoder-decoder keys/values
                keep `batch` rows, shared by a sentence's beams.
            in_place: allocate caches that `decode_step(..., in_place=True)` may write into
                (on TensorFlow inside a graph, buffers of their own, see `cache_writes_tf`).

        Returns:
            A dict: `"key_caches"`/`"value_caches"` (lists over layers of
            `[batch, heads, beams * max_length, head_dim]`), `"ancestry"` (int32
            `[batch, beams, max_length]`, see `attention_cache.reorder_ancestry`),
            `"cross_keys"`/`"cross_values"` (lists of `[batch, heads, source_length,
            head_dim]`), `"source_mask"`, and weights laid out for the step, prepared once:
            `"self_attention_qkv"` (per layer, see `stacked_query_key_value`),
            `"step_weights"` (per layer, see `TransformerDecoderLayer.step_weights`),
            `"cache_row_offsets"` (`attention_cache.cache_row_offsets`), with `beams > 1`
            `"ancestor_row_offsets"` (`attention_cache.ancestor_row_offsets`), and
            `"output_kernel"` (`[d_model, vocab]`).
        """
        if isinstance(max_length, int) and max_length > self.config.max_length:
            raise ValueError(
                f"max_length ({max_length}) exceeds the model's positional table "
                f"(config.max_length={self.config.max_length})"
            )
        batch = ops.shape(memory)[0]
        state = {"key_caches": [], "value_caches": [], "cross_keys": [], "cross_values": []}
        for layer in self.decoder_layers:
            key_cache, value_cache = layer.init_cache(
                batch, max_length, beams, memory.dtype, in_place=in_place
            )
            cross_key, cross_value = layer.compute_cross_key_value(memory)
            state["key_caches"].append(key_cache)
            state["value_caches"].append(value_cache)
            state["cross_keys"].append(cross_key)
            state["cross_values"].append(cross_value)
        state["self_attention_qkv"] = [
            layer.self_attention.stacked_query_key_value() for layer in self.decoder_layers
        ]
        state["step_weights"] = [layer.step_weights() for layer in self.decoder_layers]
        state["ancestry"] = initial_ancestry(batch, beams, max_length)
        state["cache_row_offsets"] = cache_row_offsets(
            batch, self.config.num_heads, max_length, beams
        )
        if beams > 1:
            state["ancestor_row_offsets"] = ancestor_row_offsets(
                batch, self.config.num_heads, max_length, beams
            )
        state["source_mask"] = source_mask
        state["output_kernel"] = ops.cast(self.output_kernel(), memory.dtype)
        return state

    def decode_step(self, token_ids, index, state, beams=1, in_place=False):
        """Logits for the next token after feeding `token_ids` at position `index`.

        Args:
            token_ids: int `[batch * beams]`, the tokens at position `index`; row
                `i * beams + k` is the hypothesis in slot `k` of sentence `i`.
            index: scalar int, their position (0 for `bos_id`).
            state: from `init_decoder_state`. It is not changed (by default): the new state
                holds new caches, and `state` can be decoded from again.
            beams: hypotheses per sentence.
            in_place: write this step into the caches of `state` themselves, which is faster
                on TensorFlow inside a graph (one row per slot written instead of a copy of
                each cache). `state` must come from `init_decoder_state(..., in_place=True)`
                and be passed to one step only, as `greedy_search` and `beam_search` do: its
                caches are the new state's and change with it.

        Returns:
            `(logits float32 [batch * beams, vocab], new_state)`.
        """
        hidden = self.target_embedding(
            ops.cast(token_ids, "int32")[:, None], start_index=index, training=False
        )
        ancestry = state["ancestry"]
        cache_mask = cache_attention_mask(index, ops.shape(ancestry)[2])
        # Beams read their ancestors' cache rows; the rows are the same for every layer.
        rows = None
        if beams > 1:
            rows = ancestor_rows(ancestry, state["ancestor_row_offsets"])
            if in_place and cache_writes_tf.available():
                # Op by op (the only place in-place writes run) shapes may change from step
                # to step: gather the decoded positions only, not all `max_length` (the
                # default export then translated test_2016_flickr at batch 64 in 7.7 s
                # against 11.0 s, README).
                rows, cache_mask = rows[:, :, :, : ops.cast(index, "int32") + 1], None
        key_caches, value_caches = [], []
        for i, layer in enumerate(self.decoder_layers):
            hidden, key_cache, value_cache = layer.call_step(
                hidden,
                state["key_caches"][i],
                state["value_caches"][i],
                index,
                cache_mask,
                state["cross_keys"][i],
                state["cross_values"][i],
                memory_padding_mask=state["source_mask"],
                beams=beams,
                qkv=state["self_attention_qkv"][i],
                in_place=in_place,
                row_offsets=state.get("cache_row_offsets"),
                step_weights=state["step_weights"][i] if "step_weights" in state else None,
                ancestor_rows=rows,
            )
            key_caches.append(key_cache)
            value_caches.append(value_cache)
        new_state = dict(state, key_caches=key_caches, value_caches=value_caches)
        logits = _output_logits(
            hidden[:, 0, :],
            self.decoder_norm,
            self.target_embedding,
            self.output_projection,
            output_kernel=state["output_kernel"],
        )
        return logits, new_state


def run_encoder(
    source_ids, embedding, layers, final_norm, pad_id, training=None, attention_weights=None
):
    """The encoder stack: `(memory [batch, source_length, d_model], source_mask)`.

    The functional training graph (on symbolic inputs) and `Transformer.encode` both run it,
    so training and decoding cannot drift apart. `attention_weights`, a list, receives each
    layer's self-attention weights.
    """
    source_mask = padding_mask(source_ids, pad_id)
    memory = embedding(source_ids, training=training)
    for layer in layers:
        if attention_weights is None:
            memory = layer(memory, padding_mask=source_mask, training=training)
        else:
            memory, weights = layer(
                memory, padding_mask=source_mask, return_attention_scores=True, training=training
            )
            attention_weights.append(weights)
    if final_norm is not None:
        memory = final_norm(memory)
    return memory, source_mask


def run_decoder(
    target_ids,
    memory,
    source_mask,
    embedding,
    layers,
    training=None,
    self_attention_weights=None,
    cross_attention_weights=None,
):
    """The decoder stack on a whole target: hidden states `[batch, target_length, d_model]`
    before the final norm and projection (`_output_logits`).

    Run by the functional training graph and by `Transformer.decode`. The lists
    `self_attention_weights` and `cross_attention_weights`, when given, receive each layer's
    attention weights.
    """
    hidden = embedding(target_ids, training=training)
    collect = self_attention_weights is not None or cross_attention_weights is not None
    for layer in layers:
        if not collect:
            hidden = layer(hidden, memory, memory_padding_mask=source_mask, training=training)
            continue
        hidden, self_weights, cross_weights = layer(
            hidden,
            memory,
            memory_padding_mask=source_mask,
            return_attention_scores=True,
            training=training,
        )
        if self_attention_weights is not None:
            self_attention_weights.append(self_weights)
        if cross_attention_weights is not None:
            cross_attention_weights.append(cross_weights)
    return hidden


def _output_logits(hidden, decoder_norm, target_embedding, output_projection, output_kernel=None):
    """Final norm (pre-norm only) and pre-softmax projection, shared or not: float32 logits.

    Decoding steps pass `output_kernel` (`Transformer.output_kernel()`, prepared once per
    search) for a plain `[rows, d] x [d, vocab]` product.
    """
    if decoder_norm is not None:
        hidden = decoder_norm(hidden)
    if output_kernel is not None:
        logits = ops.matmul(hidden, ops.cast(output_kernel, hidden.dtype))
    elif output_projection is None:
        logits = target_embedding(hidden, reverse=True)
    else:
        logits = output_projection(hidden)
    # The loss and softmax want float32 even when the layers compute in bfloat16.
    return ops.cast(logits, "float32")


def build_transformer(config: TransformerConfig | dict | str) -> Transformer:
    """Builds the functional encoder-decoder for `config` (a config, its dict, or a preset name)."""
    if isinstance(config, str):
        config = TransformerConfig.preset(config)
    return Transformer(config, name="transformer")
