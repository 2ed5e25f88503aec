"""Batch translation of sentences with a trained model: tokenize, decode, detokenize."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_transformer.decoding import beam_search, greedy_search


class Translator:
    """Translates lists of sentences with greedy search (`beam_size=1`) or beam search.

    Sentences are sorted by length and decoded in batches, so little compute goes to padding;
    results come back in the input order. The decoding loop runs as one `tf.function` graph,
    traced once per decoding mode.

    Args:
        model: a `keras_transformer.Transformer`.
        tokenizer: the `SubwordTokenizer` of the model's vocabulary.
        beam_size: 1 for greedy search, else beam search with this many beams.
        length_penalty_alpha: GNMT length penalty of beam search.
        extra_length: hypotheses may be this much longer than their source.
        batch_size: sentences per decoding batch.
    """

    def __init__(
        self,
        model,
        tokenizer,
        beam_size=4,
        length_penalty_alpha=0.6,
        extra_length=50,
        batch_size=64,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.beam_size = int(beam_size)
        self.batch_size = int(batch_size)
        self.max_source_length = model.config.max_length - 1
        signature = [tf.TensorSpec([None, None], tf.int32)]
        if self.beam_size == 1:
            search = lambda ids: greedy_search(model, ids, extra_length=extra_length)["target_ids"]
        else:

            def search(ids):
                result = beam_search(
                    model,
                    ids,
                    beam_size=self.beam_size,
                    length_penalty_alpha=length_penalty_alpha,
                    extra_length=extra_length,
                )
                return result["target_ids"][:, 0]

        self._search = tf.function(search, input_signature=signature)

    def encode(self, sentences: list[str]) -> list[np.ndarray]:
        """Source ids (tokens + eos) per sentence, cut to the model's maximum length."""
        ragged = self.tokenizer.tokenize(tf.constant(sentences, tf.string))
        eos = self.tokenizer.eos_id
        return [
            np.append(ids[: self.max_source_length - 1], eos).astype("int32")
            for ids in ragged.numpy()
        ]

    def translate(self, sentences: list[str]) -> list[str]:
        if not sentences:
            return []
        encoded = self.encode(list(sentences))
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        results: list[str] = [""] * len(sentences)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(encoded[row]) for row in rows)
            batch = np.zeros((len(rows), width), "int32")
            for i, row in enumerate(rows):
                batch[i, : len(encoded[row])] = encoded[row]
            target_ids = self._search(tf.constant(batch))
            texts = self.tokenizer.detokenize(target_ids).numpy()
            for row, text in zip(rows, texts, strict=True):
                results[row] = text.decode("utf-8")
        return results
