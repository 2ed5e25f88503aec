"""The decoder cache: in-place writes equal copies, ancestry bookkeeping, masks, top-k."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_transformer.decoding.common import top_k_last_axis
from keras_transformer.layers.attention_cache import (
    cache_attention_mask,
    empty_cache,
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
        return write_cache(tf.identity(cache) * 1.0, update, index, beams)

    eager = numpy(write_cache(tf.constant(cache), tf.constant(update), 3, beams))
    np.testing.assert_array_equal(numpy(in_graph(cache, update, tf.constant(3))), eager)
    expected = cache.reshape(2, 4, beams, 5, 8).copy()
    # [sentence, slot, head, d] -> [sentence, head, slot, d]
    expected[:, :, :, 3] = update.reshape(2, beams, 4, 8).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(eager, expected.reshape(cache.shape))


def test_graph_caches_are_separate_zero_buffers():
    """Two equal `zeros` would be merged by common-subexpression elimination, and an in-place
    write into one would then change the other."""

    @tf.function
    def write_keys_only(batch):
        keys = empty_cache(batch, 2, 4, 3, beams=2)
        values = empty_cache(batch, 2, 4, 3, beams=2)
        keys = write_cache(keys, tf.ones((batch * 2, 1, 2, 3)), 1, beams=2)
        return keys, values

    for _ in range(2):  # a second call must again start from zeros
        keys, values = write_keys_only(tf.constant(3))
        assert numpy(keys).sum() == 3 * 2 * 2 * 3
        assert not numpy(values).any()


def test_reorder_ancestry_follows_parents_then_own_slot():
    ancestry = numpy(initial_ancestry(1, 3, 4))
    np.testing.assert_array_equal(ancestry[0], [[0] * 4, [1] * 4, [2] * 4])
    # After position 0, new slots 0, 1, 2 continue old slots 2, 2, 0.
    ancestry = reorder_ancestry(ancestry, np.array([2, 2, 0], "int32"), 0)
    np.testing.assert_array_equal(numpy(ancestry)[0], [[2, 0, 0, 0], [2, 1, 1, 1], [0, 2, 2, 2]])
    # After position 1, slots continue old slots 1, 0, 0.
    ancestry = reorder_ancestry(ancestry, np.array([1, 0, 0], "int32"), 1)
    np.testing.assert_array_equal(numpy(ancestry)[0], [[2, 1, 0, 0], [2, 0, 1, 1], [2, 0, 2, 2]])


def test_cache_mask_selects_each_hypothesis_ancestors():
    ancestry = np.array([[[2, 1, 0, 0], [2, 0, 1, 1]]], "int32")  # 1 sentence, 2 slots
    mask = numpy(cache_attention_mask(2, 4, ancestry[:, :, :], beams=2))
    assert mask.shape == (1, 2, 1, 8)
    # Rows are slot-major: slot 0 positions 0-3, then slot 1 positions 0-3.
    np.testing.assert_array_equal(mask[0, 0, 0], [0, 0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(mask[0, 1, 0], [0, 1, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(numpy(cache_attention_mask(1, 4)), [[[[1, 1, 0, 0]]]])
    with pytest.raises(ValueError, match="beams=2 needs the ancestry"):
        cache_attention_mask(1, 4, None, beams=2)


@pytest.mark.parametrize("width", [8000, 7919, 300])
def test_two_stage_top_k_equals_top_k(width):
    rng = np.random.default_rng(width)
    x = rng.normal(size=(16, width)).astype("float32")
    x[3, :] = 0.0  # ties: values must still match
    values, ids = top_k_last_axis(tf.constant(x), 9)
    want_values, want_ids = tf.math.top_k(x, 9)
    np.testing.assert_array_equal(numpy(values), want_values.numpy())
    rows = np.arange(16) != 3
    np.testing.assert_array_equal(numpy(ids)[rows], want_ids.numpy()[rows])
    assert numpy(ids).dtype == np.int32
