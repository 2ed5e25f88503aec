"""`best_extensions`, the beam step's two-stage top-k, against a brute-force ranking."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_transformer.decoding.common import NEG_INF, best_extensions

EOS = 3


def brute_force(logits, alive, beams, k, banned=None):
    """Every extension's log-prob, ranked: `(values, tokens, parents)` `[batch, k]`."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    scores = (log_probs + alive.reshape(-1, 1)).astype("float64")
    if banned is not None:
        scores[:, banned] = NEG_INF
    vocab = logits.shape[1]
    per_sentence = scores.reshape(-1, beams * vocab)
    order = np.argsort(-per_sentence, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(per_sentence, order, axis=1), order % vocab, order // vocab


def run(logits, alive, beams, k, banned=None, ban=True):
    values, tokens, parents = best_extensions(
        tf.constant(logits), tf.constant(alive), beams, k, banned_token=banned, ban=ban
    )
    convert = keras.ops.convert_to_numpy
    return convert(values), convert(tokens), convert(parents)


# 8000 splits into whole blocks, 7919 (a prime) leaves a tail, 300 is too narrow for blocks.
@pytest.mark.parametrize("vocab", [8000, 7919, 300])
@pytest.mark.parametrize("banned", [None, EOS])
def test_best_extensions_equal_a_ranking_of_all_extensions(vocab, banned):
    """Catches a stage that drops the per-row shift (the hypothesis' log-prob and its row's
    normalizer) from the gathered blocks, picks blocks per row instead of per sentence, or
    mislabels tokens or parents of the tail."""
    rng = np.random.default_rng(vocab)
    batch, beams, k = 5, 4, 8
    logits = rng.normal(scale=3.0, size=(batch * beams, vocab)).astype("float32")
    alive = rng.normal(scale=2.0, size=(batch, beams)).astype("float32") - 5.0
    alive[1, 2:] = NEG_INF  # a sentence with dead beams, as at the first step
    # Winners among the last tokens (the tail that 7919 leaves) of beams other than the first.
    logits[1, vocab - 2] = logits[14, vocab - 3] = 15.0
    values, tokens, parents = run(logits, alive, beams, k, banned)
    want_values, want_tokens, want_parents = brute_force(logits, alive, beams, k, banned)
    np.testing.assert_allclose(values, want_values, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(parents, want_parents)
    assert tokens.dtype == np.int32 and parents.dtype == np.int32


def test_a_banned_token_that_tops_its_block_does_not_cost_a_candidate():
    """Catches picking only `k` blocks when a token is banned: eos, the best token of its
    block, would take a block's place and the `k`-th best other token (alone in its block)
    would be lost. With `ban=False` eos is the best extension."""
    beams, k, vocab = 1, 8, 8000
    logits = np.random.default_rng(0).normal(scale=0.1, size=(1, vocab)).astype("float32")
    logits[0, EOS] = 10.0
    # 100 blocks of 80: token t is in block t % 100, so these are alone in blocks 10 to 17.
    best = list(range(10, 10 + k))
    logits[0, best] = 5.0 - 0.1 * np.arange(k)
    alive = np.zeros((1, beams), "float32")
    _, tokens, _ = run(logits, alive, beams, k, banned=EOS)
    np.testing.assert_array_equal(tokens[0], best)
    _, tokens, _ = run(logits, alive, beams, k, banned=EOS, ban=tf.constant(False))
    np.testing.assert_array_equal(tokens[0], [EOS] + best[:-1])


def test_tied_rows_keep_their_values():
    """Exact ties (a row of equal logits) may come in any order, with the right values."""
    beams, k, vocab = 2, 4, 8000
    logits = np.zeros((beams, vocab), "float32")
    alive = np.array([[0.0, NEG_INF]], "float32")
    values, tokens, parents = run(logits, alive, beams, k)
    np.testing.assert_allclose(values[0], np.full(k, -np.log(vocab)), rtol=1e-6)
    assert len(set(tokens[0])) == k and not parents.any()
