"""Greedy search: cached equals uncached, length limits, batching invariance, tf.function, JAX."""

import importlib.util

import numpy as np
import pytest
import tensorflow as tf

from keras_transformer.decoding import beam_search, greedy_search, uncached_greedy_search
from tests.decoding.copy_model import CopyOracle, copy_sources, numpy, random_model
from tests.subprocess_report import run_script

# The uncached reference's first step attends over a one-token prefix, which Keras flags.
pytestmark = pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")


@pytest.fixture(scope="module")
def oracle():
    return CopyOracle()


def check_eos_and_padding(result, limits, eos):
    """Every row ends with eos or at its limit, has no earlier eos, and is padded after."""
    for row, length, limit in zip(result["target_ids"], result["lengths"], limits, strict=True):
        assert 1 <= length <= limit
        assert row[length - 1] == eos or length == limit
        assert eos not in row[: length - 1]
        assert not row[length:].any()


@pytest.mark.parametrize("seed", [1, 2])
def test_cached_greedy_equals_greedy_by_full_passes(sources, seed):
    """Holds for any weights. Sentences stop at different steps (their limits differ with
    their source lengths), so finished rows are carried along while others decode."""
    model = random_model(seed)
    cached = numpy(greedy_search(model, sources, extra_length=2))
    uncached = numpy(uncached_greedy_search(model, sources, extra_length=2))
    np.testing.assert_array_equal(cached["target_ids"], uncached["target_ids"])
    np.testing.assert_array_equal(cached["lengths"], uncached["lengths"])
    np.testing.assert_allclose(cached["scores"], uncached["scores"], atol=1e-4)
    limits = (sources != 0).sum(axis=1) + 2
    assert len(set(limits.tolist())) > 1  # by construction of the sources
    check_eos_and_padding(cached, limits, model.config.eos_id)


def test_pre_norm_random_model_cached_equals_uncached():
    model = random_model(4, norm_placement="pre")
    sources = np.array([[9, 8, 7, 3, 0], [5, 6, 7, 8, 3]], "int32")
    cached = numpy(greedy_search(model, sources, max_output_length=7))
    uncached = numpy(uncached_greedy_search(model, sources, max_output_length=7))
    np.testing.assert_array_equal(cached["target_ids"], uncached["target_ids"])
    np.testing.assert_allclose(cached["scores"], uncached["scores"], atol=1e-4)


def test_greedy_stops_each_sentence_at_its_eos(oracle):
    """The copy oracle ends every sentence with eos at a different, known length."""
    sources = copy_sources(oracle.config, 6)
    result = numpy(greedy_search(oracle, sources, extra_length=4))
    want_ids, want_lengths = oracle.expected_output(sources)
    np.testing.assert_array_equal(result["lengths"], want_lengths)
    assert len(set(want_lengths.tolist())) > 1
    np.testing.assert_array_equal(result["target_ids"][:, : sources.shape[1]], want_ids)
    assert not result["target_ids"][:, sources.shape[1] :].any()
    np.testing.assert_allclose(result["scores"], want_lengths * np.log(oracle.p_copy), rtol=1e-5)


def test_ignore_eos_forces_the_length(oracle):
    """Even where eos is the likeliest token, it is never produced."""
    sources = copy_sources(oracle.config, 6)
    result = numpy(greedy_search(oracle, sources, max_output_length=9, ignore_eos=True))
    assert result["target_ids"].shape == (len(sources), 9)
    np.testing.assert_array_equal(result["lengths"], 9)
    assert (result["target_ids"] != oracle.config.eos_id).all()
    # Where eos was the likeliest token, the runner-up took its place.
    past_source = np.arange(9)[None, :] >= (sources != 0).sum(axis=1)[:, None] - 1
    assert (result["target_ids"][past_source] == oracle.FILLER).all()


def test_default_limit_is_each_source_length_plus_extra(oracle):
    sources = copy_sources(oracle.config, 6)
    source_lengths = (sources != oracle.config.pad_id).sum(axis=1)
    result = numpy(greedy_search(oracle, sources, extra_length=3, ignore_eos=True))
    np.testing.assert_array_equal(result["lengths"], source_lengths + 3)
    assert result["target_ids"].shape[1] == sources.shape[1] + 3
    # Capped so that bos plus the output fit the positional table.
    capped = numpy(greedy_search(oracle, sources[:1], extra_length=500, ignore_eos=True))
    np.testing.assert_array_equal(capped["lengths"], oracle.config.max_length - 1)


def test_min_output_length_delays_eos(oracle):
    sources = copy_sources(oracle.config, 6)
    source_lengths = (sources != 0).sum(axis=1)
    assert source_lengths.min() < 8
    delayed = numpy(greedy_search(oracle, sources, extra_length=4, min_output_length=8))
    # Eos comes as soon as it is allowed (the oracle keeps preferring it past the source).
    lengths = delayed["lengths"]
    np.testing.assert_array_equal(
        lengths, np.minimum(np.maximum(source_lengths, 9), source_lengths + 4)
    )
    for row, source_length, length in zip(
        delayed["target_ids"], source_lengths, lengths, strict=True
    ):
        np.testing.assert_array_equal(row[source_length - 1 : length - 1], oracle.FILLER)


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_outputs_do_not_depend_on_batching_or_padding(model, sources, decode):
    def run(source_ids):
        if decode == "greedy":
            result = numpy(greedy_search(model, source_ids, extra_length=4))
        else:
            result = numpy(beam_search(model, source_ids, extra_length=4, num_returned=2))
        return result

    padded = np.pad(sources, ((0, 0), (0, 3)))
    batched = run(padded)
    for row, source in enumerate(sources):
        alone = run(source[source != 0][None])
        length = alone["lengths"][0]
        np.testing.assert_array_equal(batched["lengths"][row], length)
        np.testing.assert_array_equal(
            batched["target_ids"][row][..., : np.max(length)],
            alone["target_ids"][0][..., : np.max(length)],
        )
        np.testing.assert_allclose(batched["scores"][row], alone["scores"][0], atol=1e-4)


def test_runs_in_tf_function_with_dynamic_batch_and_length(model, sources):
    signature = [tf.TensorSpec([None, None], tf.int32)]
    greedy = tf.function(lambda s: greedy_search(model, s, extra_length=4), signature)
    beam = tf.function(lambda s: beam_search(model, s, extra_length=4, num_returned=2), signature)
    for source_ids in (sources, sources[:2, :6]):
        for graph, eager in ((greedy, greedy_search), (beam, beam_search)):
            kwargs = {"extra_length": 4} | ({"num_returned": 2} if eager is beam_search else {})
            expected = numpy(eager(model, source_ids, **kwargs))
            got = numpy(graph(tf.constant(source_ids)))
            np.testing.assert_array_equal(got["target_ids"], expected["target_ids"])
            np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-4)
    # One trace serves every batch size and length: what a SavedModel signature needs.
    assert greedy.experimental_get_tracing_count() == 1
    assert beam.experimental_get_tracing_count() == 1


JAX_SCRIPT = r"""
import json, numpy as np, jax, keras
from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.decoding import beam_search, greedy_search, uncached_greedy_search
keras.utils.set_random_seed(2)
model = build_transformer(TransformerConfig.preset("tiny"))
sources = np.array([[9, 8, 7, 3, 0], [5, 6, 7, 8, 3]], "int32")
greedy = jax.jit(lambda s: greedy_search(model, s, max_output_length=6))(sources)
uncached = uncached_greedy_search(model, sources, max_output_length=6)
beam1 = jax.jit(lambda s: beam_search(model, s, beam_size=1, length_penalty_alpha=0.0,
                                       max_output_length=6))(sources)
beam4 = jax.jit(lambda s: beam_search(model, s, max_output_length=6, num_returned=4))(sources)
# Teacher-forced log-probs of the n-best: catches a cache slot read for the wrong ancestor.
ids, lengths = np.asarray(beam4["target_ids"]), np.asarray(beam4["lengths"])
flat = ids.reshape(-1, ids.shape[-1])
inputs = np.concatenate([np.full((len(flat), 1), 2, "int32"), flat[:, :-1]], axis=1)
logits = model({"source_ids": np.repeat(sources, 4, axis=0), "target_ids": inputs})
log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
token = np.take_along_axis(log_probs, flat[..., None], axis=-1)[..., 0]
forced = (token * (np.arange(flat.shape[1]) < lengths.reshape(-1, 1))).sum(axis=1)
print(json.dumps({
    "backend": keras.config.backend(),
    "forced_gap": float(np.abs(forced - np.asarray(beam4["log_probs"]).reshape(-1)).max()),
    "greedy": np.asarray(greedy["target_ids"]).tolist(),
    "uncached": np.asarray(uncached["target_ids"]).tolist(),
    "beam1": np.asarray(beam1["target_ids"])[:, 0].tolist(),
    "beam4_scores": np.asarray(beam4["scores"]).tolist(),
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_greedy_and_beam_search_jit_on_jax():
    report = run_script(JAX_SCRIPT, backend="jax")
    assert report["backend"] == "jax"
    assert report["greedy"] == report["uncached"] == report["beam1"]
    assert report["forced_gap"] < 1e-3
    scores = np.array(report["beam4_scores"])
    assert (np.diff(scores, axis=1) <= 0).all()
