"""Helpers shared by greedy and beam search: output-length limits, masks, length penalty."""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_transformer.layers.take_rows import take_rows

# Scores of impossible hypotheses. Finite, unlike -inf, so sums and differences of masked
# scores never become NaN; anything below `NEG_INF / 2` counts as impossible.
NEG_INF = -1.0e9


def static_or_tensor_min(a, b):
    """`min(a, b)` as a Python int when both are Python ints (static shapes), else a tensor."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return ops.minimum(ops.cast(a, "int32"), ops.cast(b, "int32"))


def output_limits(model, source_ids, source_mask, max_output_length, extra_length):
    """Per-sentence output-length limits and the loop bound.

    Each sentence may produce `max_output_length` tokens (eos included) or, by default, its own
    source length (non-padding tokens) plus `extra_length`; both are capped at
    `config.max_length - 1` so that bos plus the output fit the positional table.

    Returns:
        `(bound, limits)`: `bound` is the loop bound and the width of the caches and output
        buffers, a Python int when the source's padded length is static (JAX, eager) and a
        scalar tensor otherwise (`tf.function` with a `[None, None]` signature); it is derived
        from the padded source length rather than from the data, so jit-compiled code keeps
        static shapes. `limits` is int32 `[batch]`, each `<= bound`.
    """
    cap = model.config.max_length - 1
    bound = loop_bound(model.config, ops.shape(source_ids)[1], max_output_length, extra_length)
    if max_output_length is not None:
        limits = ops.full((ops.shape(source_ids)[0],), bound, dtype="int32")
        return bound, limits
    source_lengths = ops.sum(ops.cast(source_mask, "int32"), axis=1)
    limits = ops.minimum(source_lengths + int(extra_length), cap)
    # At least one output position, even for an empty source.
    limits = ops.maximum(limits, 1)
    return bound, limits


def loop_bound(config, padded_length, max_output_length, extra_length):
    """The search's loop bound and output width for sources padded to `padded_length`.

    `max_output_length` if given, else `padded_length + extra_length`; capped at
    `config.max_length - 1` and at least 1. A Python int when `padded_length` is one.
    """
    cap = config.max_length - 1
    if max_output_length is not None:
        max_output_length = int(max_output_length)
        if max_output_length < 1:
            raise ValueError(f"max_output_length must be at least 1, got {max_output_length}")
        return min(max_output_length, cap)
    if extra_length < 0:
        raise ValueError(f"extra_length must be non-negative, got {extra_length}")
    if isinstance(padded_length, int):
        return max(min(padded_length + int(extra_length), cap), 1)
    return ops.maximum(ops.minimum(padded_length + int(extra_length), cap), 1)


def start_search(model, source_ids, max_output_length, extra_length):
    """How every search opens: checks `source_ids`, runs the encoder, sets the length limits.

    Returns:
        `(source_ids int32 [batch, source_length], memory, source_mask, bound, limits)`, see
        `Transformer.encode` and `output_limits`.
    """
    source_ids = check_source_ids(source_ids)
    memory, source_mask = model.encode(source_ids)
    bound, limits = output_limits(model, source_ids, source_mask, max_output_length, extra_length)
    return source_ids, memory, source_mask, bound, limits


def token_bias(model, forbid_eos):
    """Float32 `[vocab]` added to log-probs: `NEG_INF` at eos when `forbid_eos`, else `None`."""
    if not forbid_eos:
        return None
    bias = np.zeros((model.config.resolved_target_vocab_size,), "float32")
    bias[model.config.eos_id] = NEG_INF
    return ops.convert_to_tensor(bias)


def position_mask(index, length):
    """Boolean `[length]`, `True` only at `index`: writes a column without `slice_update`."""
    return ops.equal(ops.arange(length, dtype="int32"), ops.cast(index, "int32"))


def length_penalty(length, alpha):
    """GNMT length penalty `((5 + length) / 6) ** alpha` (Wu et al., 2016), float32."""
    return ops.power((5.0 + ops.cast(length, "float32")) / 6.0, alpha)


def check_source_ids(source_ids):
    """`source_ids` as int32 `[batch, source_length]`, with a clear error for another rank."""
    source_ids = ops.cast(ops.convert_to_tensor(source_ids), "int32")
    if len(source_ids.shape) != 2:
        raise ValueError(
            f"source_ids must be [batch, source_length], got shape {tuple(source_ids.shape)}"
        )
    return source_ids


def best_extensions(logits, alive_log_probs, beams, k, banned_token=None, ban=True):
    """Each sentence's `k` best one-token extensions over its beams, by log-probability.

    An extension of hypothesis `j` by token `y` scores `alive_log_probs[j] + log_softmax(
    logits[j])[y]`. Exact (up to the order of exact ties) and in two stages: split each row's
    vocabulary into blocks; the sentence's `k` best extensions all lie in the `k` blocks, over
    all its beams, whose best extension is largest (an extension outside them is beaten by
    those `k` blocks' best). So a max per block, one top-k over `[batch, beams * blocks]` and
    one over the `k` gathered blocks replace a top-k over `[batch, beams * vocab]`; the block
    maxima also give each row's maximum for the log-softmax normalizer. On this CPU (XLA,
    batch 32, beam 4, vocab 8000, d 128, output product included) a step took 0.97 ms against
    1.44 ms for a top-k per row in two stages, a top-k per sentence and a separate
    log-sum-exp.

    Args:
        logits: float32 `[batch * beams, vocab]` with a static `vocab`, rows grouped by sentence
            (row `i * beams + j` is slot `j` of sentence `i`).
        alive_log_probs: float32 `[batch, beams]`, each hypothesis' log-probability so far.
        beams: a Python int.
        k: a Python int, at most `beams * vocab - 1`.
        banned_token: a token id whose extensions score `NEG_INF` where `ban` holds (eos
            before the minimum length), or `None`.
        ban: a boolean scalar (Python or tensor).

    Returns:
        `(log_probs float32 [batch, k], tokens int32 [batch, k], parents int32 [batch, k])`,
        best first; `parents` are slots within the sentence.
    """
    vocab = logits.shape[-1]
    shape = ops.shape(alive_log_probs)
    sentence = ops.arange(shape[0], dtype="int32")[:, None]
    # One block more when a banned token might be the best of its block.
    picked_blocks = k + int(banned_token is not None)
    block = _block_size(vocab, picked_blocks)
    if block is None:
        shift = ops.reshape(alive_log_probs, (-1,)) - ops.logsumexp(logits, axis=-1)
        scores = logits + shift[:, None]
        ids = ops.arange(vocab, dtype="int32")
        if banned_token is not None:
            scores = ops.where(ops.logical_and(ids == banned_token, ban), NEG_INF, scores)
        values, positions = ops.top_k(ops.reshape(scores, (-1, beams * vocab)), k)
        positions = ops.cast(positions, "int32")
        return values, positions % vocab, positions // vocab
    blocks = vocab // block
    body = logits if blocks * block == vocab else logits[:, : blocks * block]
    # Block `b` is tokens `b, b + blocks, b + 2 * blocks, ...`: its max is a max across
    # `block` rows of `[block, blocks]`, element by element, which vectorizes (a max over
    # contiguous runs took 1.6x as long under XLA here).
    block_max = ops.max(ops.reshape(body, (-1, block, blocks)), axis=1)
    row_max = ops.max(block_max, axis=-1)
    tail = None
    if blocks * block < vocab:
        # The tokens past `blocks * block` are always candidates.
        tail = logits[:, blocks * block :]
        row_max = ops.maximum(row_max, ops.max(tail, axis=-1))
    normalizer = row_max + ops.log(ops.sum(ops.exp(logits - row_max[:, None]), axis=-1))
    shift = ops.reshape(alive_log_probs, (-1,)) - normalizer
    block_scores = ops.reshape(block_max + shift[:, None], (-1, beams * blocks))
    _, best = ops.top_k(block_scores, picked_blocks)
    best = ops.cast(best, "int32")
    parents = best // blocks
    rows = sentence * beams + parents
    ids = (best % blocks)[:, :, None] + blocks * ops.arange(block, dtype="int32")[None, None, :]
    # Gathers as flat lookups: `take_along_axis` builds index grids (slower here).
    candidates = take_rows(
        ops.reshape(logits, (-1,)), ops.reshape(rows[:, :, None] * vocab + ids, (-1,))
    )
    row_shift = take_rows(shift, ops.reshape(rows, (-1,)))
    candidates = ops.reshape(candidates, (-1, picked_blocks, block)) + ops.reshape(
        row_shift, (-1, picked_blocks, 1)
    )
    parents = ops.zeros_like(ids) + parents[:, :, None]
    width = picked_blocks * block
    candidates = ops.reshape(candidates, (-1, width))
    ids, parents = ops.reshape(ids, (-1, width)), ops.reshape(parents, (-1, width))
    if tail is not None:
        tail_width = vocab - blocks * block
        candidates = ops.concatenate(
            [candidates, ops.reshape(tail + shift[:, None], (-1, beams * tail_width))], axis=1
        )
        tail_ids = ops.tile(ops.arange(blocks * block, vocab, dtype="int32"), (beams,))
        tail_parents = ops.repeat(ops.arange(beams, dtype="int32"), tail_width)
        ids = ops.concatenate([ids, ops.zeros_like(parents[:, :1]) + tail_ids[None]], axis=1)
        parents = ops.concatenate(
            [parents, ops.zeros_like(parents[:, :1]) + tail_parents[None]], axis=1
        )
        width += beams * tail_width
    if banned_token is not None:
        candidates = ops.where(ops.logical_and(ids == banned_token, ban), NEG_INF, candidates)
    values, positions = ops.top_k(candidates, k)
    flat = ops.reshape(sentence * width + ops.cast(positions, "int32"), (-1,))
    tokens = ops.reshape(take_rows(ops.reshape(ids, (-1,)), flat), (-1, k))
    parents = ops.reshape(take_rows(ops.reshape(parents, (-1,)), flat), (-1, k))
    return values, tokens, parents


def _block_size(width, k):
    """A block length near `sqrt(width)`, preferring divisors of `width`; `None` if too narrow."""
    if width is None or width < 64 * k:
        return None
    root = int(np.sqrt(width))
    for block in sorted(range(max(2, root // 2), 2 * root + 1), key=lambda b: abs(b - root)):
        if width % block == 0 and width // block >= k:
            return block
    return root if width // root >= k else None
