"""Helpers shared by greedy and beam search: output-length limits, masks, length penalty."""

from __future__ import annotations

import numpy as np
from keras import ops

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
    if max_output_length is not None:
        max_output_length = int(max_output_length)
        if max_output_length < 1:
            raise ValueError(f"max_output_length must be at least 1, got {max_output_length}")
        bound = min(max_output_length, cap)
        limits = ops.full((ops.shape(source_ids)[0],), bound, dtype="int32")
        return bound, limits
    if extra_length < 0:
        raise ValueError(f"extra_length must be non-negative, got {extra_length}")
    source_lengths = ops.sum(ops.cast(source_mask, "int32"), axis=1)
    limits = ops.minimum(source_lengths + int(extra_length), cap)
    # At least one output position, even for an empty source.
    limits = ops.maximum(limits, 1)
    padded_length = ops.shape(source_ids)[1]
    if isinstance(padded_length, int):
        bound = max(min(padded_length + int(extra_length), cap), 1)
    else:
        bound = ops.maximum(ops.minimum(padded_length + int(extra_length), cap), 1)
    return bound, limits


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
