"""Greedy decoding: cached (one decoder position per step) and the uncached reference."""

from __future__ import annotations

import keras
from keras import ops

from keras_transformer.decoding.common import position_mask, start_search, token_bias


def greedy_search(
    model,
    source_ids,
    *,
    max_output_length=None,
    extra_length=50,
    min_output_length=0,
    ignore_eos=False,
    in_place=True,
):
    """Greedy decoding with the model's preallocated self-attention caches.

    Each step feeds one token per sentence to `model.decode_step`; the loop is an
    `ops.while_loop` with fixed-shape state, so it traces once inside `tf.function` (dynamic
    batch and source length) and under `jax.jit`, and stops as soon as every sentence is
    finished.

    Args:
        model: a `keras_transformer.Transformer`.
        source_ids: int `[batch, source_length]`, `config.pad_id` as padding.
        max_output_length: output tokens per sentence (eos included); `None` means each
            sentence's source length (non-padding tokens) plus `extra_length`. Capped at
            `config.max_length - 1`.
        extra_length: see `max_output_length` (50, as in the paper, §6.1).
        min_output_length: eos cannot be produced before this many tokens.
        ignore_eos: never produce eos, so every sentence has exactly its length limit: a fixed
            output length, e.g. to compare throughput with other engines like for like.
        in_place: write the caches in place on TensorFlow (`cache_writes_tf`); `False` inside
            an XLA-compiled function (`jit_compile=True`), which has no `InplaceUpdate` and
            updates loop buffers in place by itself.

    Returns:
        A dict: `"target_ids"` int32 `[batch, max_steps]` (the tokens after bos, eos included
        when produced, `config.pad_id` after it; `max_steps` is the loop bound, from the padded
        source length), `"lengths"` int32 `[batch]` (tokens produced, eos included) and
        `"scores"` float32 `[batch]` (sum of the tokens' log-probabilities).
    """
    source_ids, memory, source_mask, bound, limits = start_search(
        model, source_ids, max_output_length, extra_length
    )
    # Each step's caches feed only the next step: they can be written in place.
    state = model.init_decoder_state(memory, source_mask, bound, in_place=in_place)
    caches = {"key_caches": state["key_caches"], "value_caches": state["value_caches"]}

    def next_logits(tokens, index, caches):
        logits, new_state = model.decode_step(
            tokens, index, dict(state, **caches), in_place=in_place
        )
        return logits, {
            "key_caches": new_state["key_caches"],
            "value_caches": new_state["value_caches"],
        }

    return _greedy_loop(
        model, next_logits, caches, source_ids, bound, limits, min_output_length, ignore_eos
    )


def uncached_greedy_search(
    model,
    source_ids,
    *,
    max_output_length=None,
    extra_length=50,
    min_output_length=0,
    ignore_eos=False,
):
    """Greedy decoding that re-runs the decoder on the whole prefix at every step.

    The reference that `greedy_search` must equal, and the baseline that shows what the caches
    save. Arguments and result are those of `greedy_search`. On TensorFlow each step decodes
    the prefix `[batch, step + 1]`; JAX needs static shapes inside its loop, so there each step
    decodes the whole `[batch, max_steps]` buffer (causality makes the later positions
    irrelevant) and reads the step's position.
    """
    source_ids, memory, source_mask, bound, limits = start_search(
        model, source_ids, max_output_length, extra_length
    )
    batch = ops.shape(source_ids)[0]
    decoder_inputs = ops.full((batch, bound), model.config.pad_id, dtype="int32")
    slice_prefix = keras.config.backend() == "tensorflow"

    def next_logits(tokens, index, decoder_inputs):
        decoder_inputs = ops.where(
            position_mask(index, bound)[None, :], tokens[:, None], decoder_inputs
        )
        if slice_prefix:
            logits = model.decode(decoder_inputs[:, : index + 1], memory, source_mask)
            return logits[:, -1], decoder_inputs
        logits = model.decode(decoder_inputs, memory, source_mask)
        return ops.take(logits, index, axis=1), decoder_inputs

    return _greedy_loop(
        model,
        next_logits,
        decoder_inputs,
        source_ids,
        bound,
        limits,
        min_output_length,
        ignore_eos,
    )


def _greedy_loop(
    model, next_logits, carry, source_ids, bound, limits, min_output_length, ignore_eos
):
    """The loop both greedy searches share; `next_logits(tokens, index, carry)` differs."""
    config = model.config
    min_output_length = int(min_output_length)
    bias = token_bias(model, ignore_eos or min_output_length > 0)
    batch = ops.shape(source_ids)[0]

    def cond(index, tokens, finished, scores, lengths, target_ids, carry):
        return ops.logical_and(ops.less(index, bound), ops.logical_not(ops.all(finished)))

    def body(index, tokens, finished, scores, lengths, target_ids, carry):
        logits, carry = next_logits(tokens, index, carry)
        allowed = logits
        if bias is not None:
            if ignore_eos:
                allowed = logits + bias
            else:
                allowed = logits + bias * ops.cast(index < min_output_length, "float32")
        next_tokens = ops.cast(ops.argmax(allowed, axis=-1), "int32")
        # log_softmax at the chosen token, without writing the whole log_softmax.
        best_log_probs = ops.max(allowed, axis=-1) - ops.logsumexp(logits, axis=-1)
        next_tokens = ops.where(finished, ops.cast(config.pad_id, "int32"), next_tokens)
        scores = scores + ops.where(finished, 0.0, best_log_probs)
        lengths = lengths + ops.cast(ops.logical_not(finished), "int32")
        target_ids = ops.where(
            position_mask(index, bound)[None, :], next_tokens[:, None], target_ids
        )
        finished = ops.logical_or(
            finished,
            ops.logical_or(ops.equal(next_tokens, config.eos_id), index + 1 >= limits),
        )
        return index + 1, next_tokens, finished, scores, lengths, target_ids, carry

    loop_vars = (
        ops.convert_to_tensor(0, dtype="int32"),
        ops.full((batch,), config.bos_id, dtype="int32"),
        ops.zeros((batch,), dtype="bool"),
        ops.zeros((batch,), dtype="float32"),
        ops.zeros((batch,), dtype="int32"),
        ops.full((batch, bound), config.pad_id, dtype="int32"),
        carry,
    )
    _, _, _, scores, lengths, target_ids, _ = ops.while_loop(cond, body, loop_vars)
    return {"target_ids": target_ids, "lengths": lengths, "scores": scores}
