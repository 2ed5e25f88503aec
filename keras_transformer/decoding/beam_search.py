"""Beam search with GNMT length penalty, alive/finished bookkeeping and cached decoding."""

from __future__ import annotations

from keras import ops

from keras_transformer.decoding.common import (
    NEG_INF,
    best_extensions,
    length_penalty,
    position_mask,
    start_search,
)
from keras_transformer.layers.attention_cache import reorder_ancestry
from keras_transformer.layers.take_rows import take_rows


def beam_search(
    model,
    source_ids,
    *,
    beam_size=4,
    length_penalty_alpha=0.6,
    max_output_length=None,
    extra_length=50,
    min_output_length=0,
    num_returned=1,
    ignore_eos=False,
    in_place=True,
):
    """Beam search as in the paper (§6.1: beam 4, alpha 0.6, source length + 50).

    Every sentence keeps `beam_size` alive hypotheses and, separately, the `beam_size` best
    finished ones, so a hypothesis that produced eos is never extended (the bookkeeping of
    tensor2tensor and the Model Garden). Each step keeps the `2 * beam_size` best of a
    sentence's `beam_size * vocab` extensions (`best_extensions`, exact, in two stages): the
    best `beam_size` that do not end stay alive, and those that end (eos, or the sentence's
    length limit) while ranked within the first `beam_size` join the finished set, scored
    `log_prob / ((5 + length) / 6) ** alpha` (Wu et al., 2016). With `beam_size=1` and
    `alpha=0` this is exactly greedy search.

    A sentence is done when its `num_returned`-th best finished score is at least the best
    score an alive hypothesis could still reach (its log-prob can only fall; the penalty is
    at most that of the longest allowed output), or when nothing is alive; the loop stops when
    every sentence is done. A done sentence's alive hypotheses are dropped, so a sentence gets
    the same result alone or in any batch.

    Decoding is incremental: `model.init_decoder_state(..., beams=beam_size)` preallocates
    self-attention caches with `beam_size` slots per sentence, written in place each step
    (`in_place=True`: each step's state is used once) and
    never reordered: a surviving hypothesis inherits its parent's *ancestry* (which slot holds
    its token at each position, `[batch, beam_size, max_steps]` int32), and attention is masked
    to it. The encoder-decoder keys/values stay `[batch, source_length, ...]`, shared by a
    sentence's beams. The loop is an
    `ops.while_loop` with fixed-shape state: it traces once inside `tf.function` (dynamic batch
    and length) and under `jax.jit`.

    Args:
        model: a `keras_transformer.Transformer`.
        source_ids: int `[batch, source_length]`, `config.pad_id` as padding.
        beam_size: hypotheses kept per sentence.
        length_penalty_alpha: `alpha` of the GNMT length penalty; 0 ranks by log-probability.
        max_output_length: output tokens per sentence (eos included); `None` means each
            sentence's source length (non-padding tokens) plus `extra_length`. Capped at
            `config.max_length - 1`.
        extra_length: see `max_output_length`.
        min_output_length: eos cannot be produced before this many tokens.
        num_returned: hypotheses returned per sentence (n-best), at most `beam_size`.
        ignore_eos: never produce eos, so hypotheses end at the length limit exactly.
        in_place: write the caches in place on TensorFlow (`cache_writes_tf`); `False` inside
            an XLA-compiled function (`jit_compile=True`), which has no `InplaceUpdate` and
            updates loop buffers in place by itself.

    Returns:
        A dict, hypotheses sorted by score, best first: `"target_ids"` int32
        `[batch, num_returned, max_steps]` (the tokens after bos, eos included when produced,
        `config.pad_id` after it), `"scores"` float32 `[batch, num_returned]` (length-penalized),
        `"log_probs"` float32 `[batch, num_returned]` (sums of token log-probabilities) and
        `"lengths"` int32 `[batch, num_returned]` (eos included). A hypothesis slot that was
        never filled has a score below `NEG_INF / 2`.
    """
    config = model.config
    beams = int(beam_size)
    num_returned = int(num_returned)
    vocab = config.resolved_target_vocab_size
    if beams < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if not 1 <= num_returned <= beams:
        raise ValueError(f"num_returned must be in [1, beam_size={beams}], got {num_returned}")
    if 2 * beams + 1 > vocab:
        raise ValueError(f"beam_size ({beams}) must be below half the vocabulary ({vocab})")
    alpha = float(length_penalty_alpha)
    min_output_length = int(min_output_length)
    candidates = 2 * beams

    source_ids, memory, source_mask, bound, limits = start_search(
        model, source_ids, max_output_length, extra_length
    )
    batch = ops.shape(source_ids)[0]
    # Each step's caches feed only the next step: they can be written in place.
    state = model.init_decoder_state(memory, source_mask, bound, beams=beams, in_place=in_place)
    forbid_eos = ignore_eos or min_output_length > 0
    limit_penalty = length_penalty(limits, alpha)
    # Row offsets of each sentence's first beam/candidate/finished slot in flattened tensors.
    sentence = ops.arange(batch, dtype="int32")[:, None]
    top_ranked = ops.arange(candidates, dtype="int32")[None, :] < beams

    def gather(values, flat_rows, width):
        """`values [batch, slots, ...]` at `flat_rows [batch * width]` -> `[batch, width, ...]`."""
        shape = ops.shape(values)
        rows = take_rows(ops.reshape(values, (-1, *shape[2:])), flat_rows)
        return ops.reshape(rows, (-1, width, *shape[2:]))

    def cond(index, tokens, alive_ids, alive_log_probs, finished, done, caches):
        return ops.logical_and(ops.less(index, bound), ops.logical_not(ops.all(done)))

    def body(index, tokens, alive_ids, alive_log_probs, finished, done, caches):
        logits, new_state = model.decode_step(
            tokens, index, dict(state, **caches), beams=beams, in_place=in_place
        )
        ban_eos = True if ignore_eos else index < min_output_length
        top_log_probs, top_tokens, parents = best_extensions(
            logits,
            alive_log_probs,
            beams,
            candidates,
            banned_token=config.eos_id if forbid_eos else None,
            ban=ban_eos,
        )
        length = index + 1
        ends = ops.logical_or(ops.equal(top_tokens, config.eos_id), (length >= limits)[:, None])
        # Candidate sequences [batch, 2 * beams, max_steps]: the parent's with this token.
        candidate_ids = gather(
            alive_ids, ops.reshape(sentence * beams + parents, (-1,)), candidates
        )
        candidate_ids = ops.where(
            position_mask(index, bound)[None, None, :], top_tokens[:, :, None], candidate_ids
        )

        # Alive: the best `beams` candidates that do not end.
        alive_log_probs, picked = ops.top_k(ops.where(ends, NEG_INF, top_log_probs), beams)
        picked_rows = ops.reshape(sentence * candidates + ops.cast(picked, "int32"), (-1,))
        alive_ids = gather(candidate_ids, picked_rows, beams)
        tokens = take_rows(ops.reshape(top_tokens, (-1,)), picked_rows)
        parent_rows = take_rows(ops.reshape(parents, (-1,)), picked_rows)
        cache_rows = ops.reshape(sentence * beams + ops.reshape(parent_rows, (-1, beams)), (-1,))
        # The caches stay where they are; the survivors inherit their parents' ancestry.
        caches = {
            "key_caches": new_state["key_caches"],
            "value_caches": new_state["value_caches"],
            "ancestry": reorder_ancestry(new_state["ancestry"], cache_rows, index),
        }

        # Finished: ending candidates ranked within the first `beams`, merged with those kept.
        valid = top_log_probs > NEG_INF / 2
        new_scores = ops.where(
            ops.logical_and(ops.logical_and(ends, top_ranked), valid),
            top_log_probs / length_penalty(length, alpha),
            NEG_INF,
        )
        merged_scores = ops.concatenate([finished["scores"], new_scores], axis=1)
        scores, kept = ops.top_k(merged_scores, beams)
        kept_rows = ops.reshape(sentence * (beams + candidates) + ops.cast(kept, "int32"), (-1,))
        finished = {
            "scores": scores,
            "ids": gather(
                ops.concatenate([finished["ids"], candidate_ids], axis=1), kept_rows, beams
            ),
            "log_probs": gather(
                ops.concatenate([finished["log_probs"], top_log_probs], axis=1),
                kept_rows,
                beams,
            ),
            "lengths": gather(
                ops.concatenate([finished["lengths"], ops.zeros_like(top_tokens) + length], axis=1),
                kept_rows,
                beams,
            ),
        }

        # Done: the n-th finished beats anything alive could still reach, or nothing is alive.
        best_alive = alive_log_probs[:, 0]
        best_reachable = best_alive / ops.maximum(length_penalty(length + 1, alpha), limit_penalty)
        done = ops.logical_or(
            done,
            ops.logical_or(best_alive < NEG_INF / 2, scores[:, num_returned - 1] >= best_reachable),
        )
        alive_log_probs = ops.where(done[:, None], NEG_INF, alive_log_probs)
        return index + 1, tokens, alive_ids, alive_log_probs, finished, done, caches

    first_beam = ops.arange(beams) == 0
    loop_vars = (
        ops.convert_to_tensor(0, dtype="int32"),
        ops.full((batch * beams,), config.bos_id, dtype="int32"),
        ops.full((batch, beams, bound), config.pad_id, dtype="int32"),
        # Only the first beam is alive at the start: the others would repeat it.
        ops.zeros((batch, beams), dtype="float32") + ops.where(first_beam, 0.0, NEG_INF)[None],
        {
            "scores": ops.full((batch, beams), NEG_INF, dtype="float32"),
            "ids": ops.full((batch, beams, bound), config.pad_id, dtype="int32"),
            "log_probs": ops.full((batch, beams), NEG_INF, dtype="float32"),
            "lengths": ops.zeros((batch, beams), dtype="int32"),
        },
        ops.zeros((batch,), dtype="bool"),
        {name: state[name] for name in ("key_caches", "value_caches", "ancestry")},
    )
    outputs = ops.while_loop(cond, body, loop_vars)
    finished = outputs[4]
    return {
        "target_ids": finished["ids"][:, :num_returned],
        "scores": finished["scores"][:, :num_returned],
        "log_probs": finished["log_probs"][:, :num_returned],
        "lengths": finished["lengths"][:, :num_returned],
    }
