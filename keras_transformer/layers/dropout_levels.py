"""The dropout rule both backends' masks follow (`dropout_tf`, `dropout_jax`).

Each element gets an 8-bit uniform number (four per 32-bit random word) and is dropped when
that number is below `threshold(rate)`: the drop probability is the rate rounded to a
multiple of 1/256 (0.1 -> 26/256 = 0.1016), and kept elements are scaled by
`256 / (256 - threshold)`, so the expectation is unchanged. Where that rounding would move
the rate by more than 2% of itself (some rates under 0.1, such as 0.01 -> 3/256 = 0.0117;
never 0.1 or more) an element gets a 16-bit number instead (two per word; 0.01 ->
655/65536 = 0.009995). `Dropout(bits=16)` asks for 16 bits whatever the rate.

Why 8 bits: the random words are most of dropout's cost on the CPU (TensorFlow's Philox,
about 1.7 ns per word on two cores), and dropout was 8% of the `small` bf16 training step's
wall time; a quarter of a word per element instead of a half made that step 1.03x faster
(`benchmarks/training_step_ab.py --variants dropout16,ours`).
"""

from __future__ import annotations

MAX_RELATIVE_ERROR = 0.02


def default_bits(rate: float) -> int:
    """8, or 16 where rounding the rate to a multiple of 1/256 would move it by more than
    `MAX_RELATIVE_ERROR` of itself."""
    return 8 if abs(effective_rate(rate, 8) - rate) <= MAX_RELATIVE_ERROR * rate else 16


def resolve_bits(rate: float, bits: int | None = None) -> int:
    """`bits` if given (8 or 16), else `default_bits(rate)`."""
    if bits is None:
        return default_bits(rate)
    if bits not in (8, 16):
        raise ValueError(f"Dropout bits must be 8, 16 or None, got {bits!r}")
    return bits


def threshold(rate: float, bits: int | None = None) -> int:
    """Elements whose number is below this are dropped: `round(rate * 2**bits)`, at most
    `2**bits - 1` so that one level is always kept."""
    levels = 1 << resolve_bits(rate, bits)
    return min(int(round(rate * levels)), levels - 1)


def effective_rate(rate: float, bits: int | None = None) -> float:
    """The drop probability the masks have: `threshold / 2**bits`."""
    return threshold(rate, bits) / (1 << resolve_bits(rate, bits))


def scale(rate: float, bits: int | None = None) -> float:
    """The factor kept elements are multiplied by: the inverse of the rounded keep
    probability."""
    levels = 1 << resolve_bits(rate, bits)
    return levels / (levels - threshold(rate, bits))
