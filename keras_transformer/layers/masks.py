"""Mask helpers shared by the attention layers and the model."""

from keras import ops


def padding_mask(ids, pad_id=0):
    """Boolean `[batch, length]`, `True` at real tokens and `False` at `pad_id`."""
    return ops.not_equal(ids, pad_id)


def masked_fill_value(dtype):
    """A score low enough to zero a softmax weight, yet finite in `dtype`.

    -1e9 overflows float16 to -inf, and a row of -inf (a fully padded query) turns into NaN;
    a finite value gives that row uniform weights instead, which later masking ignores.
    """
    return -6.0e4 if str(dtype) == "float16" else -1.0e9
