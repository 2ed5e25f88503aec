"""The 16-bit dropout rule both backends' masks follow (`dropout_tf`, `dropout_jax`).

Each element gets a 16-bit uniform number and is dropped when that number is below
`threshold(rate)`: the drop probability is the rate rounded to a multiple of 1/65536
(0.1 -> 0.100006), and kept elements are scaled by `65536 / (65536 - threshold)`, so the
expectation is unchanged. One 32-bit random word gives two such numbers.
"""

LEVELS = 65536


def threshold(rate: float) -> int:
    """Elements whose 16-bit number is below this are dropped: `round(rate * 65536)`, at
    most 65535 so that one level is always kept."""
    return min(int(round(rate * LEVELS)), LEVELS - 1)


def scale(rate: float) -> float:
    """The factor kept elements are multiplied by: the inverse of the rounded keep
    probability."""
    return LEVELS / (LEVELS - threshold(rate))
