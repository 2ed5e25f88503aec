"""The decoder cache: default writes leave the caller's state alone, in-place writes (the
searches' opt-in) equal them, ancestry bookkeeping, ancestor rows."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.decoding import greedy_search
from keras_transformer.layers.attention_cache import (
    ancestor_row_offsets,
    ancestor_rows,
    cache_attention_mask,
    empty_cache,
    gather_ancestors,
    initial_ancestry,
    reorder_ancestry,
    write_cache,
)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("beams", [1, 3])
def test_in_graph_write_equals_eager_write(beams):
    rng = np.random.default_rng(0)
    cache = rng.normal(size=(2, 4, beams * 5, 8)).astype("float32")
    # As the key projection gives it: rows (sentence, slot), then heads.
    update = rng.normal(size=(2 * beams, 1, 4, 8)).astype("float32")

    @tf.function
    def in_graph(cache, update, index):
        # A copy first: the in-place write must not touch the caller's tensor.
        in_place = write_cache(tf.identity(cache) * 1.0, update, index, beams, in_place=True)
        return in_place, write_cache(cache, update, index, beams)

    eager = numpy(write_cache(tf.constant(cache), tf.constant(update), 3, beams))
    in_place, copied = in_graph(cache, update, tf.constant(3))
    np.testing.assert_array_equal(numpy(in_place), eager)
    np.testing.assert_array_equal(numpy(copied), eager)
    expected = cache.reshape(2, 4, beams, 5, 8).copy()
    # [sentence, slot, head, d] -> [sentence, head, slot, d]
    expected[:, :, :, 3] = update.reshape(2, beams, 4, 8).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(eager, expected.reshape(cache.shape))


def test_graph_caches_are_separate_zero_buffers():
    """Two equal `zeros` would be merged by common-subexpression elimination, and an in-place
    write into one would then change the other."""

    @tf.function
    def write_keys_only(batch):
        keys = empty_cache(batch, 2, 4, 3, beams=2, in_place=True)
        values = empty_cache(batch, 2, 4, 3, beams=2, in_place=True)
        keys = write_cache(keys, tf.ones((batch * 2, 1, 2, 3)), 1, beams=2, in_place=True)
        return keys, values

    for _ in range(2):  # a second call must again start from zeros
        keys, values = write_keys_only(tf.constant(3))
        assert numpy(keys).sum() == 3 * 2 * 2 * 3
        assert not numpy(values).any()


SOURCE = np.array([[7, 8, 9, 3], [11, 12, 3, 0]], "int32")


def decode_from_one_state_twice(model, beams=1):
    """Steps 0 and 1, then step 1 again from the same state with other tokens, then with the
    first tokens again: `(first logits, other logits, repeated logits, state after step 0)`."""
    memory, mask = model.encode(SOURCE)
    state = model.init_decoder_state(memory, mask, max_length=5, beams=beams)
    rows = 2 * beams
    _, state = model.decode_step(tf.fill([rows], 2), 0, state, beams=beams)
    first, _ = model.decode_step(tf.fill([rows], 20), 1, state, beams=beams)
    other, _ = model.decode_step(tf.fill([rows], 30), 1, state, beams=beams)
    repeated, _ = model.decode_step(tf.fill([rows], 20), 1, state, beams=beams)
    return first, other, repeated, state


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("beams", [1, 2])
def test_decode_step_leaves_the_state_it_is_given_unchanged(mode, beams):
    """Catches a default `decode_step` that writes the caller's caches in place (as
    `in_place=True` does inside a graph): the state after step 0 would then hold step 1's
    keys, and a second decode from it would differ."""
    keras.utils.set_random_seed(0)
    model = build_transformer(TransformerConfig.preset("tiny"))
    run = decode_from_one_state_twice
    if mode == "graph":
        run = tf.function(lambda: decode_from_one_state_twice(model, beams))
        first, other, repeated, state = run()
    else:
        first, other, repeated, state = run(model, beams)
    np.testing.assert_allclose(numpy(repeated), numpy(first), atol=1e-6)
    assert np.abs(numpy(other) - numpy(first)).max() > 1e-4
    for cache in state["key_caches"] + state["value_caches"]:
        slots = numpy(cache).reshape(2, -1, beams, 5, numpy(cache).shape[-1])
        assert slots[:, :, :, 0].any()  # step 0 written
        assert not slots[:, :, :, 1:].any()  # nothing after it, whatever came later


def graph_op_types(concrete_function):
    """Op types of a traced function, including those of its nested functions (loop bodies)."""
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return types


def test_only_the_searches_write_in_place_and_nothing_needs_xla():
    """The default step scatters into a copy (`TensorScatterUpdate`), the compiled search opts
    in to `InplaceUpdate`, and neither needs an XLA op (a stock model server has none)."""
    model = build_transformer(TransformerConfig.preset("tiny"))
    signature = [tf.TensorSpec([None, None], tf.int32)]

    def one_step(source_ids):
        memory, mask = model.encode(source_ids)
        state = model.init_decoder_state(memory, mask, max_length=4)
        return model.decode_step(tf.fill(tf.shape(source_ids)[:1], 2), 0, state)[0]

    step_ops = graph_op_types(tf.function(one_step).get_concrete_function(*signature))
    search = tf.function(lambda s: greedy_search(model, s, max_output_length=4)["target_ids"])
    search_ops = graph_op_types(search.get_concrete_function(*signature))
    assert "TensorScatterUpdate" in step_ops and "InplaceUpdate" not in step_ops
    assert "InplaceUpdate" in search_ops and "Empty" in search_ops
    assert not {op for op in step_ops | search_ops if op.startswith("Xla")}


def test_reorder_ancestry_follows_parents_then_own_slot():
    ancestry = numpy(initial_ancestry(1, 3, 4))
    np.testing.assert_array_equal(ancestry[0], [[0] * 4, [1] * 4, [2] * 4])
    # After position 0, new slots 0, 1, 2 continue old slots 2, 2, 0.
    ancestry = reorder_ancestry(ancestry, np.array([2, 2, 0], "int32"), 0)
    np.testing.assert_array_equal(numpy(ancestry)[0], [[2, 0, 0, 0], [2, 1, 1, 1], [0, 2, 2, 2]])
    # After position 1, slots continue old slots 1, 0, 0.
    ancestry = reorder_ancestry(ancestry, np.array([1, 0, 0], "int32"), 1)
    np.testing.assert_array_equal(numpy(ancestry)[0], [[2, 1, 0, 0], [2, 0, 1, 1], [2, 0, 2, 2]])


def test_each_hypothesis_reads_its_ancestors_rows():
    """Catches ancestor rows that mix up slot, head or sentence order in the cache layout
    (`[batch, heads, slots * max_length, head_dim]`), which would let a hypothesis attend to
    another hypothesis' history."""
    batch, heads, beams, length, head_dim = 2, 3, 2, 4, 1
    # Each cache row holds its own (sentence, head, slot, position) as a number.
    cache = np.zeros((batch, heads, beams * length, head_dim), "float32")
    for b, h, k, t in np.ndindex(batch, heads, beams, length):
        cache[b, h, k * length + t, 0] = 1000 * b + 100 * h + 10 * k + t
    ancestry = np.array(
        [[[1, 0, 0, 0], [1, 1, 0, 1]], [[0, 1, 1, 1], [1, 0, 1, 0]]], "int32"
    )  # [sentence, hypothesis, position] -> slot
    rows = ancestor_rows(ancestry, ancestor_row_offsets(batch, heads, length, beams))
    assert tuple(rows.shape) == (batch, beams, heads, length)
    gathered = numpy(gather_ancestors(tf.constant(cache), rows))[..., 0]
    for b, j, h, t in np.ndindex(batch, beams, heads, length):
        assert gathered[b, j, h, t] == 1000 * b + 100 * h + 10 * ancestry[b, j, t] + t
    np.testing.assert_array_equal(numpy(cache_attention_mask(1, 4)), [[[[1, 1, 0, 0]]]])


def test_a_beam_step_without_ancestor_rows_is_refused():
    model = build_transformer(TransformerConfig.preset("tiny"))
    layer = model.decoder_layers[0].self_attention
    key_cache, value_cache = empty_cache(1, 4, 3, 8, beams=2), empty_cache(1, 4, 3, 8, beams=2)
    with pytest.raises(ValueError, match="beams=2 needs ancestor_rows"):
        layer.call_cached(
            tf.zeros((2, 1, 32)), key_cache, value_cache, 0, cache_attention_mask(0, 3), beams=2
        )
