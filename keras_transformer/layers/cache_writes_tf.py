"""In-place writes of the decoder caches on TensorFlow: the opt-in of compiled searches.

This is the only module with TensorFlow-specific cache code. It exists because neither generic
write is right for a TensorFlow graph that a model server runs:

- `ops.slice_update` lowers to `XlaDynamicUpdateSlice` on TensorFlow, which a stock
  `tensorflow_model_server` runs only with XLA compilation switched on;
- `ops.scatter_update` (`TensorScatterUpdate`) copies the whole cache at every step, for every
  layer, to write one row per hypothesis.

The core `InplaceUpdate` op writes the rows into the buffer it is given and returns it. That
mutates its input, so it is safe only when the decoding loop is the buffer's sole user: the
buffer comes from `Empty` (stateful, so never constant-folded, cached across calls, or merged
with the other caches by common-subexpression elimination, as equal `zeros` would be), and each
state is passed to exactly one step. `greedy_search` and `beam_search` guarantee that; a caller
of `Transformer.decode_step` gets it only by asking (`in_place=True`).

Outside a graph (eagerly) these writes are not used: an eager tensor may be held by the caller.
"""

from __future__ import annotations


def available():
    """Whether in-place writes apply here: TensorFlow, inside a `tf.function` graph."""
    import keras

    if keras.config.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.inside_function()


def empty_buffer(shape, dtype):
    """A zero-initialised `shape` tensor with a buffer of its own (`Empty`, `init=True`)."""
    import tensorflow as tf

    return tf.raw_ops.Empty(shape=tf.stack(shape), dtype=dtype, init=True)


def write_rows_in_place(flat, rows, values):
    """`flat[rows] = values` in `flat`'s own buffer; returns `flat`.

    Args:
        flat: `[num_rows, width]`, a reshape of a buffer from `empty_buffer` (a reshape shares
            the buffer).
        rows: int32 `[n]`, distinct rows.
        values: `[n, width]`.
    """
    import tensorflow as tf

    return tf.raw_ops.InplaceUpdate(x=flat, i=rows, v=values)
