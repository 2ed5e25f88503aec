"""The decoder's self-attention cache: layout, writes, and beam ancestry.

Layout: one cache per layer for keys and one for values, each
`[batch, heads, beams * max_length, head_dim]`. Row block `k * max_length + t` holds what beam
*slot* `k` of a sentence computed at position `t`. Beam search never reorders the cache (a
reorder is a copy of every cache at every step, which on a 2-core CPU cost as much as the
matrix products). Instead it keeps an *ancestry* `[batch, beams, max_length]`: the slot whose
row holds hypothesis `j`'s token at each position. Each step, hypothesis `j` reads its
ancestors' rows (`ancestor_rows`, `gather_ancestors`: one gather per cache, `max_length` rows
per hypothesis and head) and attends to them, masked to positions `<= index`; op by op, where
shapes may change from step to step, it gathers positions `<= index` only
(`Transformer.decode_step`). Attending to all
`beams * max_length` rows of the sentence masked to the ancestors instead gives the same
output with `beams` times the products: under XLA on this CPU the gather made a beam-4
self-attention 3x faster (84 against 270 us a layer at batch 32, d 128).

Writes, by default, return a new cache and leave the one they were given unchanged: a scatter
of the step's rows (`ops.scatter_update`, `TensorScatterUpdate` on TensorFlow, which needs no
XLA; on JAX, XLA updates the buffer in place inside a loop anyway). With `in_place=True` a
TensorFlow graph writes into the cache's own buffer instead (`cache_writes_tf`): a step then
touches one row per slot instead of copying the cache, but the cache given is changed, so the
searches, which pass each state once, are its only users.
"""

from __future__ import annotations

from keras import ops

from keras_transformer.layers import cache_writes_tf
from keras_transformer.layers.take_rows import take_rows


def empty_cache(
    batch_size, num_heads, max_length, head_dim, beams=1, dtype="float32", in_place=False
):
    """A zero cache `[batch_size, num_heads, beams * max_length, head_dim]`.

    With `in_place=True`, inside a TensorFlow graph, it has a buffer of its own that
    `write_cache(..., in_place=True)` may write into (see `cache_writes_tf`).
    """
    shape = (batch_size, num_heads, beams * max_length, head_dim)
    if in_place and cache_writes_tf.available():
        return cache_writes_tf.empty_buffer(shape, dtype)
    return ops.zeros(shape, dtype=dtype)


def cache_row_offsets(batch_size, num_heads, max_length, beams=1):
    """Int32 `[batch_size * beams * num_heads]`: the flat cache row of position 0 for each row
    of a step's update (rows in (sentence, slot, head) order, as the projections give them).

    A step writes row `offset + index`. The offsets depend only on the shapes, so a search
    computes them once (`Transformer.init_decoder_state`) rather than in every layer's write
    at every step, which were a dozen index ops per write.
    """
    order = ops.arange(batch_size * beams * num_heads, dtype="int32")
    sentence, rest = order // (beams * num_heads), order % (beams * num_heads)
    slot, head = rest // num_heads, rest % num_heads
    return ((sentence * num_heads + head) * beams + slot) * ops.cast(max_length, "int32")


def write_cache(cache, update, index, beams=1, in_place=False, row_offsets=None):
    """Writes `update` at position `index` of every slot.

    Args:
        cache: `[batch, heads, beams * max_length, head_dim]`.
        update: the step's keys or values as the projection gives them,
            `[batch * beams, 1, heads, head_dim]` (rows in (sentence, slot, head) order).
        index: scalar int, the position written.
        beams: slots per sentence.
        in_place: write into `cache`'s buffer where the backend allows it (TensorFlow inside a
            graph, a cache from `empty_cache(..., in_place=True)`): `cache` itself changes.
        row_offsets: `cache_row_offsets(...)` for this cache's shape, if the caller has them.

    Returns:
        The cache with the step written.
    """
    shape = ops.shape(cache)
    head_dim = shape[3]
    update = ops.reshape(update, (-1, head_dim))
    if row_offsets is None:
        row_offsets = cache_row_offsets(shape[0], shape[1], shape[2] // beams, beams)
    flat_rows = row_offsets + ops.cast(index, "int32")
    flat = ops.reshape(cache, (-1, head_dim))
    if in_place and cache_writes_tf.available():
        written = cache_writes_tf.write_rows_in_place(flat, flat_rows, update)
    else:
        written = ops.scatter_update(flat, flat_rows[:, None], update)
    return ops.reshape(written, shape)


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
        take_rows(ops.reshape(ancestry, (-1, max_length)), parent_rows),
        (-1, beams, max_length),
    )
    own = ops.arange(beams, dtype="int32")[None, :, None]
    decoded = ops.arange(max_length, dtype="int32")[None, None, :] <= ops.cast(index, "int32")
    return ops.where(decoded, inherited, own)


def cache_attention_mask(index, max_length):
    """Boolean `[1, 1, 1, max_length]`: the cache positions a step at `index` may attend to
    (`<= index`), broadcastable to the step's scores `[batch, rows, heads, max_length]`."""
    positions = ops.arange(max_length, dtype="int32")
    return (positions <= ops.cast(index, "int32"))[None, None, None, :]


def ancestor_row_offsets(batch_size, num_heads, max_length, beams):
    """Int32 `[batch_size, 1, num_heads, max_length]`: the row of the cache flattened to
    `[-1, head_dim]` that holds slot 0's key (value) for each sentence, head and position.
    Slot `k`'s row is `k * max_length` further. It depends only on the shapes, so a search
    computes it once (`Transformer.init_decoder_state`) and `ancestor_rows` adds the slots."""
    sentence = ops.arange(batch_size, dtype="int32")[:, None, None, None]
    head = ops.arange(num_heads, dtype="int32")[None, None, :, None]
    position = ops.arange(max_length, dtype="int32")[None, None, None, :]
    return (sentence * num_heads + head) * (beams * ops.cast(max_length, "int32")) + position


def ancestor_rows(ancestry, row_offsets):
    """Where each hypothesis' ancestors sit in a cache, for `gather_ancestors`.

    Args:
        ancestry: int32 `[batch, beams, max_length]` (see `reorder_ancestry`).
        row_offsets: `ancestor_row_offsets(...)` for the caches' shape.

    Returns:
        Int32 `[batch, beams, num_heads, max_length]`: for hypothesis `j` of a sentence, head
        `h` and position `t`, the row of the cache flattened to `[-1, head_dim]` that holds
        its ancestor's key (value) at `t`. The same for every layer, so a step computes it once.
    """
    max_length = ops.shape(ancestry)[2]
    return row_offsets + ops.cast(ancestry, "int32")[:, :, None, :] * max_length


def gather_ancestors(cache, rows):
    """`cache [batch, heads, beams * max_length, head_dim]` at `ancestor_rows(...)` ->
    `[batch, beams, heads, max_length, head_dim]`: each hypothesis' own history."""
    # The static head size: no shape ops in the loop body.
    return take_rows(ops.reshape(cache, (-1, cache.shape[-1])), rows)
