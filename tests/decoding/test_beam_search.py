"""Beam search: beam 1 is greedy, scores match a full pass, n-best order, bounds and limits."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.decoding import beam_search, greedy_search
from tests.decoding.copy_model import CopyOracle, copy_sources, numpy
from tests.decoding.markov_model import EOS, FILLERS, A, B, MarkovModel, trap_table


def penalty(lengths, alpha):
    return ((5.0 + np.asarray(lengths, "float64")) / 6.0) ** alpha


def nbest_search(model):
    return lambda s: beam_search(model, s, beam_size=4, extra_length=4, num_returned=4)


# "graph" runs the search as a SavedModel does, with the caches written in place
# (`InplaceUpdate`); eagerly they are written into copies.
@pytest.fixture(scope="module", params=["eager", "graph"])
def nbest(request, model, sources):
    search = nbest_search(model)
    if request.param == "graph":
        search = tf.function(search, input_signature=[tf.TensorSpec([None, None], tf.int32)])
    return numpy(search(tf.constant(sources)))


def test_beam_one_without_length_penalty_is_greedy(model, sources):
    greedy = numpy(greedy_search(model, sources, extra_length=4))
    beam = numpy(beam_search(model, sources, beam_size=1, length_penalty_alpha=0.0, extra_length=4))
    np.testing.assert_array_equal(beam["target_ids"][:, 0], greedy["target_ids"])
    np.testing.assert_array_equal(beam["lengths"][:, 0], greedy["lengths"])
    np.testing.assert_allclose(beam["log_probs"][:, 0], greedy["scores"], atol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_beam_finds_the_best_output_where_greedy_falls_into_the_trap(mode):
    """On a model whose best output is known (by construction and by enumeration), beam
    search finds it and greedy search does not. Catches a beam that keeps only its first
    slot alive, ranks candidates by the wrong score, or drops finished hypotheses."""
    model = MarkovModel(trap_table())
    best_tokens, best_log_prob, best_score = model.best_output(3, alpha=0.6)
    assert best_tokens == (B, EOS)
    sources = np.array([[7, 8, EOS], [9, EOS, 0]], "int32")
    signature = [tf.TensorSpec([None, None], tf.int32)]

    def beam(s):
        return beam_search(model, s, beam_size=4, max_output_length=3, num_returned=2)

    def greedy(s):
        return greedy_search(model, s, max_output_length=3)

    if mode == "graph":
        beam, greedy = tf.function(beam, signature), tf.function(greedy, signature)
    result = numpy(beam(tf.constant(sources)))
    np.testing.assert_array_equal(result["target_ids"][:, 0], [[B, EOS, 0]] * 2)
    np.testing.assert_allclose(result["scores"][:, 0], best_score, rtol=1e-5)
    np.testing.assert_allclose(result["log_probs"][:, 0], best_log_prob, rtol=1e-5)
    # The runner-up is the greedy path's best completion: A, one of the (equal) fillers, eos.
    runner_up = result["target_ids"][:, 1]
    assert (runner_up[:, 0] == A).all() and (runner_up[:, 2] == EOS).all()
    assert set(runner_up[:, 1].tolist()) <= set(FILLERS)
    greedy_ids = numpy(greedy(tf.constant(sources)))["target_ids"]
    np.testing.assert_array_equal(greedy_ids[:, 0], [A, A])


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_beam_returns_the_copy_oracles_output(mode):
    """A model whose best output is known (the source) and ends each sentence at a different
    length: the best hypothesis is it, the runner-up differs, and the rows are padded."""
    oracle = CopyOracle()
    sources = copy_sources(oracle.config, 5)
    search = nbest_search(oracle)
    if mode == "graph":
        search = tf.function(search, input_signature=[tf.TensorSpec([None, None], tf.int32)])
    result = numpy(search(tf.constant(sources)))
    want_ids, want_lengths = oracle.expected_output(sources)
    np.testing.assert_array_equal(result["lengths"][:, 0], want_lengths)
    np.testing.assert_array_equal(result["target_ids"][:, 0, : sources.shape[1]], want_ids)
    np.testing.assert_allclose(
        result["log_probs"][:, 0], want_lengths * np.log(oracle.p_copy), rtol=1e-5
    )
    assert (result["scores"][:, 1] < result["scores"][:, 0]).all()
    for row, length in zip(result["target_ids"][:, 0], want_lengths, strict=True):
        assert not row[length:].any()


def test_nbest_is_sorted_distinct_and_scored_by_the_gnmt_penalty(nbest):
    scores, log_probs, lengths = nbest["scores"], nbest["log_probs"], nbest["lengths"]
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_allclose(scores, log_probs / penalty(lengths, 0.6), rtol=1e-5)
    for hypotheses in nbest["target_ids"]:
        assert len({tuple(row) for row in hypotheses}) == len(hypotheses)


def test_hypothesis_log_probs_equal_a_full_teacher_forced_pass(model, sources, nbest):
    """Catches any hypothesis that attended to cache rows outside its ancestry."""
    config = model.config
    batch, count, width = nbest["target_ids"].shape
    targets = nbest["target_ids"].reshape(batch * count, width)
    lengths = nbest["lengths"].reshape(-1)
    decoder_inputs = np.concatenate(
        [np.full((batch * count, 1), config.bos_id, "int32"), targets[:, :-1]], axis=1
    )
    logits = keras.ops.convert_to_numpy(
        model({"source_ids": np.repeat(sources, count, axis=0), "target_ids": decoder_inputs})
    )
    log_probs = keras.ops.convert_to_numpy(keras.ops.log_softmax(logits, axis=-1))
    token_log_probs = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = np.arange(width)[None, :] < lengths[:, None]
    expected = (token_log_probs * mask).sum(axis=1)
    np.testing.assert_allclose(nbest["log_probs"].reshape(-1), expected, atol=1e-3)
    for row, length in zip(targets, lengths, strict=True):
        assert not row[length:].any()
        assert config.eos_id not in row[: length - 1]


def test_ignore_eos_forces_the_length(model, sources):
    result = numpy(
        beam_search(model, sources, max_output_length=7, ignore_eos=True, num_returned=2)
    )
    assert result["target_ids"].shape == (len(sources), 2, 7)
    np.testing.assert_array_equal(result["lengths"], 7)
    assert (result["target_ids"] != model.config.eos_id).all()


def test_rejects_bad_arguments(model, sources):
    with pytest.raises(ValueError, match=r"num_returned must be in \[1, beam_size=2\], got 3"):
        beam_search(model, sources, beam_size=2, num_returned=3)
    with pytest.raises(ValueError, match="source_ids must be"):
        beam_search(model, sources[0])


def test_concurrent_and_repeated_graph_calls_do_not_share_caches(model, sources):
    """The in-place cache writes need a fresh buffer per call, as a model server runs
    requests concurrently through one graph."""
    search = tf.function(
        nbest_search(model), input_signature=[tf.TensorSpec([None, None], tf.int32)]
    )
    inputs = [tf.constant(sources[:3]), tf.constant(sources[3:]), tf.constant(sources[::-1])]
    expected = [numpy(search(source_ids)) for source_ids in inputs]
    results = [None] * (2 * len(inputs))

    def run(slot):
        results[slot] = numpy(search(inputs[slot % len(inputs)]))

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot, result in enumerate(results):
        want = expected[slot % len(inputs)]
        np.testing.assert_array_equal(result["target_ids"], want["target_ids"])
        np.testing.assert_allclose(result["scores"], want["scores"], atol=1e-5)


def test_searches_run_under_mixed_bfloat16():
    """Step weights prepared once per search (stacked q/k/v, output kernel) follow the
    compute dtype; beam 1 still equals greedy."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_transformer(TransformerConfig.preset("tiny"))
        source_ids = tf.constant([[5, 6, 7, 3], [8, 9, 3, 0]])
        signature = [tf.TensorSpec([None, None], tf.int32)]
        greedy = tf.function(lambda s: greedy_search(model, s, max_output_length=6), signature)
        beam = tf.function(
            lambda s: beam_search(
                model, s, beam_size=1, length_penalty_alpha=0.0, max_output_length=6
            ),
            signature,
        )
        greedy_ids = numpy(greedy(source_ids))["target_ids"]
        beam_result = numpy(beam(source_ids))
    finally:
        keras.config.set_dtype_policy(previous)
    assert beam_result["scores"].dtype == np.float32
    np.testing.assert_array_equal(beam_result["target_ids"][:, 0], greedy_ids)
