"""A decoder whose next-token distribution is a fixed table: search results known exactly.

It has the interface the searches call (`config`, `encode`, `init_decoder_state`,
`decode_step`), but the logits depend only on the previous token, so the probability of any
output is a product of table entries and the best output can be found by enumeration. No
training is involved: the tests that use it do not depend on a seed or a machine.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from keras import ops

from keras_transformer import TransformerConfig
from keras_transformer.layers.attention_cache import initial_ancestry

PAD, BOS, EOS = 0, 2, 3
# The trap of greedy search: after bos, A is likelier than B, but everything after A is
# uncertain while B is followed by eos almost surely.
A, B = 4, 5
FILLERS = tuple(range(6, 16))


def trap_table(vocab_size=16):
    """Row `t`: the next-token probabilities after token `t` (`[vocab, vocab]`, rows sum to 1)."""
    table = np.full((vocab_size, vocab_size), 1e-6)
    table[BOS, A], table[BOS, B] = 0.5, 0.4
    table[A, list(FILLERS)] = 0.09
    table[B, EOS] = 0.95
    for filler in FILLERS:
        table[filler, EOS] = 0.9
    # Every other row (pad, unk, eos, ...) continues with eos: never the best path anyway.
    for row in range(vocab_size):
        if table[row].sum() < 0.5:
            table[row, EOS] = 0.9
    return table / table.sum(axis=1, keepdims=True)


class MarkovModel:
    """`decode_step` returns `log(table[previous token])`; the source is ignored."""

    def __init__(self, table):
        self.table = np.asarray(table, "float64")
        self.log_table = ops.convert_to_tensor(np.log(self.table).astype("float32"))
        self.config = TransformerConfig.preset(
            "tiny", vocab_size=len(table), max_length=16, pad_id=PAD, bos_id=BOS, eos_id=EOS
        )

    def encode(self, source_ids):
        source_ids = ops.cast(source_ids, "int32")
        return ops.cast(source_ids, "float32")[..., None], ops.not_equal(source_ids, PAD)

    def init_decoder_state(self, memory, source_mask, max_length, beams=1, **kwargs):
        batch = ops.shape(memory)[0]
        return {
            "key_caches": [],
            "value_caches": [],
            "ancestry": initial_ancestry(batch, beams, max_length),
        }

    def decode_step(self, token_ids, index, state, beams=1, **kwargs):
        return ops.take(self.log_table, ops.cast(token_ids, "int32"), axis=0), dict(state)

    def best_output(self, max_output_length, alpha):
        """The best output by enumeration: `(tokens with eos, log-prob, GNMT score)`.

        An output ends with eos or at `max_output_length` tokens, as in the searches.
        """
        best = None
        vocab = range(len(self.table))
        for length in range(1, max_output_length + 1):
            for tokens in itertools.product(vocab, repeat=length):
                ends_with_eos = tokens[-1] == EOS
                if EOS in tokens[:-1] or (not ends_with_eos and length < max_output_length):
                    continue
                previous = (BOS, *tokens[:-1])
                pairs = zip(previous, tokens, strict=True)
                log_prob = sum(math.log(self.table[p, t]) for p, t in pairs)
                score = log_prob / ((5.0 + length) / 6.0) ** alpha
                if best is None or score > best[2]:
                    best = (tokens, log_prob, score)
        return best
