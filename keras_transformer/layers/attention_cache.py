"""The decoder's self-attention cache: layout, in-place writes, and beam ancestry masks.

Layout: one cache per layer for keys and one for values, each
`[batch, heads, beams * max_length, head_dim]`. Row block `k * max_length + t` holds what beam
*slot* `k` of a sentence computed at position `t`. Beam search never reorders the cache (a
reorder is a copy of every cache at every step, which on a 2-core CPU cost as much as the
matrix products). Instead it keeps an *ancestry* `[batch, beams, max_length]`: the slot whose
row holds hypothesis `j`'s token at each position. Hypothesis `j` attends to all
`beams * max_length` cached rows of its sentence, masked to its own ancestors; the extra
products are `beams` times those of one row each, small next to the projections.

Writes are in place where the backend allows it, so a step touches one row per slot instead of
copying the cache:

- JAX: `slice_update` (XLA's `dynamic_update_slice`, in place inside `while_loop`).
- TensorFlow in a graph: the core `InplaceUpdate` op on a reshaped view. It mutates its input,
  which is safe here because the decoding loop is the cache's only user: the buffer comes from
  `Empty` (stateful, so never constant-folded or shared between the key and value caches, as
  two equal `zeros` would be after common-subexpression elimination) and each step's write
  feeds that step's attention. `ops.slice_update` is not used on TensorFlow: it lowers to
  `XlaDynamicUpdateSlice`, which a stock `tensorflow_model_server` runs only with XLA.
- TensorFlow eagerly: a scatter into a copy, so a caller's old state is never changed.
"""

from __future__ import annotations

import keras
from keras import ops


def empty_cache(batch_size, num_heads, max_length, head_dim, beams=1, dtype="float32"):
    """A zero cache `[batch_size, num_heads, beams * max_length, head_dim]` of its own buffer."""
    shape = (batch_size, num_heads, beams * max_length, head_dim)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        if tf.inside_function():
            return tf.raw_ops.Empty(shape=tf.stack(shape), dtype=dtype, init=True)
    return ops.zeros(shape, dtype=dtype)


def write_cache(cache, update, index, beams=1):
    """Writes `update` at position `index` of every slot.

    Args:
        cache: `[batch, heads, beams * max_length, head_dim]`.
        update: the step's keys or values as the projection gives them,
            `[batch * beams, 1, heads, head_dim]` (rows in (sentence, slot, head) order).
        index: scalar int, the position written.
        beams: slots per sentence.

    Returns:
        The cache with the step written (on TensorFlow inside a graph, the same buffer).
    """
    batch, heads, rows, head_dim = (ops.shape(cache)[i] for i in range(4))
    max_length = rows // beams
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        update = tf.reshape(update, (-1, head_dim))
        # Update row (sentence i, slot k, head h) goes to flat cache row
        # ((i * heads + h) * beams + k) * max_length + index; no transpose of the update.
        order = tf.range(tf.shape(update)[0])
        sentence, rest = order // (beams * heads), order % (beams * heads)
        slot, head = rest // heads, rest % heads
        flat_rows = ((sentence * heads + head) * beams + slot) * max_length
        flat_rows = flat_rows + tf.cast(index, "int32")
        flat = tf.reshape(cache, (-1, head_dim))
        if tf.inside_function():
            written = tf.raw_ops.InplaceUpdate(x=flat, i=flat_rows, v=update)
        else:
            written = tf.tensor_scatter_nd_update(flat, flat_rows[:, None], update)
        return tf.reshape(written, tf.shape(cache))
    update = ops.transpose(ops.reshape(update, (batch, beams, heads, head_dim)), (0, 2, 1, 3))
    slots = ops.reshape(cache, (batch, heads, beams, max_length, head_dim))
    slots = ops.slice_update(slots, (0, 0, 0, index, 0), update[:, :, :, None, :])
    return ops.reshape(slots, (batch, heads, rows, head_dim))


def initial_ancestry(batch_size, beams, max_length):
    """Int32 `[batch_size, beams, max_length]`: every hypothesis is its own ancestor."""
    slots = ops.arange(beams, dtype="int32")[None, :, None]
    return ops.zeros((batch_size, beams, max_length), dtype="int32") + slots


def reorder_ancestry(ancestry, parent_rows, index):
    """Ancestry after a beam-search step that kept, for each new slot, the row `parent_rows`.

    Args:
        ancestry: `[batch, beams, max_length]` before the step.
        parent_rows: int `[batch * beams]`, the flattened `(sentence, slot)` row of each new
            hypothesis' parent.
        index: the position just decoded.

    Returns:
        The new ancestry: the parent's up to `index`, the new slot itself after it (the slot
        where the next step writes).
    """
    shape = ops.shape(ancestry)
    beams, max_length = shape[1], shape[2]
    inherited = ops.reshape(
        ops.take(ops.reshape(ancestry, (-1, max_length)), parent_rows, axis=0),
        (-1, beams, max_length),
    )
    own = ops.arange(beams, dtype="int32")[None, :, None]
    decoded = ops.arange(max_length, dtype="int32")[None, None, :] <= ops.cast(index, "int32")
    return ops.where(decoded, inherited, own)


def cache_attention_mask(index, max_length, ancestry=None, beams=1):
    """Boolean mask of the cache rows each hypothesis may attend to at step `index`.

    Returns:
        `[1, 1, 1, max_length]` without beams (positions `<= index`), else
        `[batch, beams, 1, beams * max_length]` (hypothesis, head, cache row): positions
        `<= index` in the slot that holds the hypothesis' ancestor there.
    """
    index = ops.cast(index, "int32")
    positions = ops.arange(max_length, dtype="int32")
    if beams == 1:
        return (positions <= index)[None, None, None, :]
    if ancestry is None:
        raise ValueError(f"beams={beams} needs the ancestry of the hypotheses, got None")
    slot_of_row = ops.repeat(ops.arange(beams, dtype="int32"), max_length)
    ancestor_of_row = ops.tile(ancestry, (1, 1, beams))
    mask = ops.logical_and(
        ops.equal(ancestor_of_row, slot_of_row[None, None, :]),
        ops.tile(positions <= index, (beams,))[None, None, :],
    )
    return mask[:, :, None, :]
