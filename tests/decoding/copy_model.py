"""Models for the decoding tests that need no training: random weights, and a copy oracle.

The searches' properties checked on a real `Transformer` (cached equals uncached, beam 1 equals
greedy, scores equal teacher-forced log-probs, batching invariance) hold for any weights, so
those tests use random ones. What needs a known output (eos at known, different lengths) uses
`CopyOracle`, a hand-built model that copies its source: no seed or training decides it.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.layers.attention_cache import initial_ancestry
from tests.core.copy_task import copy_task_batch


@functools.cache
def random_model(seed=1, norm_placement="post"):
    """A `tiny` Transformer with random weights (seeded); cached per process."""
    keras.utils.set_random_seed(seed)
    return build_transformer(TransformerConfig.preset("tiny", norm_placement=norm_placement))


def copy_sources(config, num_examples=6, seed=7):
    """Copy-task sources: 3 to 8 tokens in `[4, vocab)` then eos, 0-padded (lengths differ)."""
    x, _ = copy_task_batch(config, num_examples, seed=seed)
    return x["source_ids"]


class CopyOracle:
    """A decoder that puts probability `p_copy` on the source token at each position (eos
    included, and eos past the source), twice the others' share on unk (the choice when eos is
    forbidden) and spreads the rest evenly: greedy and beam search must return the source.

    It has the interface the searches call (`config`, `encode`, `init_decoder_state`,
    `decode_step`); the logits do not depend on the tokens fed, only on the position.
    """

    FILLER = 1  # unk: never a source token of `copy_sources`, nor eos

    def __init__(self, vocab_size=16, p_copy=0.6):
        self.config = TransformerConfig.preset("tiny", vocab_size=vocab_size, max_length=24)
        self.p_copy = p_copy

    def encode(self, source_ids):
        source_ids = ops.cast(source_ids, "int32")
        mask = ops.not_equal(source_ids, self.config.pad_id)
        return ops.cast(source_ids, "float32")[..., None], mask

    def init_decoder_state(self, memory, source_mask, max_length, beams=1, **kwargs):
        source = ops.cast(memory[..., 0], "int32")
        # One row per hypothesis; positions past the source read eos.
        padding = ops.full((ops.shape(source)[0], max_length), self.config.eos_id, "int32")
        source = ops.where(ops.equal(source, self.config.pad_id), self.config.eos_id, source)
        rows = ops.concatenate([source, padding], axis=1)
        return {
            "key_caches": [],
            "value_caches": [],
            "ancestry": initial_ancestry(ops.shape(source)[0], beams, max_length),
            "source_rows": ops.repeat(rows, beams, axis=0),
        }

    def decode_step(self, token_ids, index, state, beams=1, **kwargs):
        vocab = self.config.resolved_target_vocab_size
        # p_copy + 2 * share (filler) + (vocab - 2) * share (the others) = 1.
        share = (1.0 - self.p_copy) / vocab
        target = ops.take(state["source_rows"], ops.cast(index, "int32"), axis=1)
        token = ops.arange(vocab, dtype="int32")[None, :]
        log_probs = ops.where(
            ops.equal(token, self.FILLER), np.float32(np.log(2 * share)), np.float32(np.log(share))
        )
        log_probs = ops.where(
            ops.equal(token, target[:, None]), np.float32(np.log(self.p_copy)), log_probs
        )
        return log_probs, dict(state)

    def expected_output(self, source_ids):
        """`(target_ids [batch, width], lengths)`: each source up to its eos, pad after."""
        source_ids = np.asarray(source_ids)
        lengths = (source_ids != self.config.pad_id).sum(axis=1)
        return source_ids, lengths


def numpy(result):
    """A search's result dict as NumPy arrays."""
    return {name: keras.ops.convert_to_numpy(value) for name, value in result.items()}
