"""`Translator`: text -> ids -> search -> text for a `Transformer`, the one place it is done.

`training.evaluate`, the dev-BLEU callback, the decoding benchmark and the SavedModel export all
use this module, so the BLEU printed in training is the BLEU of the graph that is served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_transformer.decoding import beam_search, greedy_search
from keras_transformer.decoding.common import loop_bound
from keras_transformer.decoding.settings import DecodeSettings
from keras_transformer.translation.tokenizer import check_vocabulary

TEXT_SPEC = tf.TensorSpec([None], tf.string, name="text")
IDS_SPEC = tf.TensorSpec([None, None], tf.int32, name="source_ids")


# Rows of the smallest shard `Translator(concurrent_searches=...)` splits a bucket into.
MIN_SHARD_ROWS = 4
# The values `concurrent_searches` may take: powers of two, so buckets split evenly.
CONCURRENT_SEARCHES = (1, 2, 4, 8)
# One search per core of this 2-core CPU. Beam 4, batch 32, XLA, against CTranslate2 in two
# runs of benchmarks/decoding_throughput.py (README): 4 searches 1.12x and 1.34x against 2's
# 1.14x and 1.23x at d 128, but 1.01x and 0.97x against 1.04x and 1.06x at d 256.
DEFAULT_CONCURRENT_SEARCHES = 2


class Translator(tf.Module):
    """A `Transformer`, its tokenizer and its `DecodeSettings` behind text and id signatures.

    Input handling (every input has a defined result, never a graph error):
    - bytes that are not valid UTF-8 are replaced by U+FFFD before tokenization;
    - empty or whitespace-only text -> an empty translation (and score 0);
    - more than `config.max_length - 1` source tokens -> the first `max_length - 1` are kept,
      eos is appended, and `truncated` is True;
    - a batch of zero strings -> zero results.

    Signatures (`tf.function`s with fixed input signatures; `signatures()` for the export):
    - `serving_default(text [batch])` -> `translations [batch]`, `truncated [batch]`: beam
      search with `settings.beam_size` (greedy search when it is 1).
    - `beam(text)` -> also `nbest_translations [batch, nbest]`, `nbest_scores [batch, nbest]`
      (length-penalized log-probabilities, best first) and `nbest_target_ids` int32
      `[batch, nbest, target_length]` (the hypotheses' ids, eos included, then `pad_id`).
    - `greedy(text)` -> `translations`, `truncated`: greedy search.
    - `greedy_ids(source_ids int32 [batch, length])`, `beam_ids(source_ids)` -> `target_ids`
      int32 `[batch, target_length]`, `scores` float32 `[batch]`: the searches on ids that end
      in eos, without tokenization; whatever follows a row's first eos counts as padding.

    Python list API: `translate(sentences)` and `translate_nbest(sentences)` sort the sentences
    by source length, run the signatures above on batches of `settings.batch_size` and return
    the results in input order. Search results do not depend on the other rows of a batch
    (padding is masked), so this equals one sentence at a time and the served model.

    Args:
        model: a trained `keras_transformer.Transformer`.
        tokenizer: the `SubwordTokenizer` of its vocabulary (`check_vocabulary` is applied), or
            `None` for a module with only the id signatures (random-weight benchmarks).
        settings: `DecodeSettings`; the paper's defaults when `None`.
        fixed_output_length: if set, every output has exactly this many tokens (end of
            sentence is ignored): for throughput comparisons with other engines, not for
            translation.
        jit_compile: run each search as one XLA computation (`tf.function(jit_compile=True)`)
            instead of op by op: 3-4x faster for one sentence on a CPU, where the op-by-op
            loop is dispatch overhead. XLA compiles once per input shape, so the ids go in
            padded to a bucket (batch 1, 2, 4, 8, then multiples of 8, repeating the last row;
            length a multiple of 8) and the results are cut back. A stock
            `tensorflow_model_server` runs such an export only with
            `--xla_cpu_compilation_enabled=true`; without it every decoding request fails
            (INTERNAL "XLA compilation disabled"). Outputs agree with the op-by-op search up to
            float rounding (XLA fuses and reorders arithmetic): see the README for how often a
            translation differs.
        concurrent_searches: split a batch (with `jit_compile`, its bucket) into up to this
            many shards (a power of two, at least 4 rows each) searched at the same time.
            Sentences are searched independently, so results are unchanged; a step's small
            products leave the other core idle about half the time, and concurrent shards fill
            it (XLA, beam 4, batch 32, 2 cores: 2 shards against one search 1.3x at d 128,
            1.1-1.2x at d 256; op by op 1.14x and 1.04x). About one per core; more compete
            for the caches (4 at d 256 were slower than 2).
        name: module name.

    Example:
        >>> translator = Translator(model, tokenizer, DecodeSettings(beam_size=4))
        >>> translator.translate(["A dog runs.", ""])  # ["Ein Hund rennt.", ""]
        >>> translator.serving_default(tf.constant(["A dog runs."]))["translations"]
    """

    def __init__(
        self,
        model,
        tokenizer,
        settings: DecodeSettings | None = None,
        *,
        fixed_output_length: int | None = None,
        jit_compile: bool = False,
        concurrent_searches: int = DEFAULT_CONCURRENT_SEARCHES,
        name: str = "translation",
    ):
        super().__init__(name=name)
        if tokenizer is not None:
            check_vocabulary(model.config, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or DecodeSettings()
        self.nbest = self.settings.resolved_nbest
        self.fixed_output_length = fixed_output_length
        self.jit_compile = bool(jit_compile)
        concurrent_searches = int(concurrent_searches)
        if concurrent_searches not in CONCURRENT_SEARCHES:
            raise ValueError(f"concurrent_searches must be 1, 2, 4 or 8, got {concurrent_searches}")
        self.concurrent_searches = concurrent_searches
        # Source tokens plus eos fill the positional table; outputs are capped by the search.
        self.max_source_tokens = model.config.max_length - 1
        if fixed_output_length:
            self.length_options = dict(max_output_length=int(fixed_output_length), ignore_eos=True)
        else:
            self.length_options = dict(extra_length=self.settings.extra_length)

    def describe(self) -> dict:
        """What this module does to its inputs, as recorded in an export's `export.json`."""
        return {
            "decode_settings": self.settings.to_dict(),
            "compute_dtype": self.model.compute_dtype,
            "nbest": self.nbest,
            "max_source_tokens": self.max_source_tokens,
            "fixed_output_length": self.fixed_output_length,
            "jit_compile": self.jit_compile,
            "concurrent_searches": self.concurrent_searches,
        }

    # -- text <-> ids ------------------------------------------------------------------------
    @staticmethod
    def repair(text: tf.Tensor) -> tf.Tensor:
        """Replaces every byte sequence that is not valid UTF-8 by U+FFFD."""
        return tf.strings.unicode_transcode(
            text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
        )

    def encode(self, text: tf.Tensor):
        """Text to source ids.

        Args:
            text: `tf.string` `[batch]`.

        Returns:
            `(source_ids, empty, truncated)`: int32 `[batch, length]` (tokens, eos, then
            `pad_id`), bool `[batch]` (empty or whitespace-only text), bool `[batch]` (tokens
            were cut).
        """
        text = self.repair(text)
        empty = tf.equal(tf.strings.length(tf.strings.strip(text)), 0)
        tokens = self.tokenizer.tokenize(text)
        truncated = tokens.row_lengths() > self.max_source_tokens
        tokens = tf.cast(tokens[:, : self.max_source_tokens], tf.int32)
        eos = tf.fill([tokens.nrows(), 1], tf.constant(self.tokenizer.eos_id, tf.int32))
        source_ids = tf.concat([tokens, eos], axis=1).to_tensor(self.tokenizer.pad_id)
        return source_ids, empty, truncated

    def source_lengths(self, text: tf.Tensor) -> tf.Tensor:
        """int64 `[batch]`: source tokens per sentence before truncation (to sort by)."""
        return self.tokenizer.tokenize(self.repair(text)).row_lengths()

    # -- searches ----------------------------------------------------------------------------
    def search(self, source_ids: tf.Tensor, beam_size: int, num_returned: int = 1):
        """Greedy (`beam_size == 1`) or beam search.

        Args:
            source_ids: int32 `[batch, length]`, each row ending in eos, padded with `pad_id`.
            beam_size: a Python int.
            num_returned: hypotheses returned per sentence (1 for greedy search).

        Returns:
            `(target_ids, scores)`: int32 `[batch, num_returned, target_length]`, float32
            `[batch, num_returned]`.
        """

        def run():
            if self.jit_compile:
                return self._compiled_search(source_ids, beam_size, num_returned)
            # Traced once and called per shard: the graph (and the SavedModel) holds one
            # copy of the search, not one per shard of every branch of `_concurrently`.
            searched = tf.function(lambda ids: self._search(ids, beam_size, num_returned))
            return self._concurrently(source_ids, searched)

        def nothing():
            return tf.zeros([0, num_returned, 1], tf.int32), tf.zeros([0, num_returned])

        # A batch of zero rows skips decoding: "zero in, zero out" without a loop over nothing.
        return tf.cond(tf.shape(source_ids)[0] > 0, run, nothing)

    def _search(self, source_ids, beam_size, num_returned, in_place=True):
        """`search` op by op (`in_place`: see `beam_search`)."""
        if beam_size == 1:
            result = greedy_search(self.model, source_ids, in_place=in_place, **self.length_options)
            return result["target_ids"][:, None], result["scores"][:, None]
        result = beam_search(
            self.model,
            source_ids,
            beam_size=beam_size,
            length_penalty_alpha=self.settings.length_penalty_alpha,
            num_returned=num_returned,
            in_place=in_place,
            **self.length_options,
        )
        return result["target_ids"], result["scores"]

    def _concurrently(self, source_ids, search):
        """`search(source_ids)` as `shard_count(batch, concurrent_searches)` shards of rows
        whose searches run at once (independent ops: TensorFlow's executor runs them in
        parallel), their `(target_ids, scores)` concatenated in order."""
        batch = tf.shape(source_ids)[0]
        count = shard_count(batch, self.concurrent_searches)

        def sharded(shards):
            def run():
                edges = [i * batch // shards for i in range(shards + 1)]
                results = [search(source_ids[edges[i] : edges[i + 1]]) for i in range(shards)]
                return tuple(tf.concat(parts, axis=0) for parts in zip(*results, strict=True))

            return run

        run, shards = sharded(1), 1
        while shards < self.concurrent_searches:
            shards *= 2
            run = _either(tf.equal(count, shards), sharded(shards), run)
        return run()

    def _compiled_search(self, source_ids, beam_size, num_returned):
        """`search` as one XLA computation on `source_ids` padded to a shape bucket.

        Extra rows repeat the last sentence, so they finish when it does and add no steps;
        extra columns are padding, which the encoder masks. The bucket is searched as
        `shard_count(...)` equal shards at once (`_concurrently`), each its own compiled
        search (one compiled shape per shard size). The output is cut back to the rows and
        the width (`loop_bound`) of the unpadded ids.
        """
        config = self.model.config
        shape = tf.shape(source_ids)
        batch, length = shape[0], shape[1]
        small = tf.constant([1, 2, 4, 8], tf.int32)
        batch_bucket = tf.where(
            batch <= 8,
            tf.reduce_min(tf.where(small >= batch, small, 8)),
            (batch + 7) // 8 * 8,
        )
        # Never past the positional table, never shorter than the input.
        length_bucket = tf.maximum(tf.minimum((length + 7) // 8 * 8, config.max_length), length)
        rows = tf.minimum(tf.range(batch_bucket), batch - 1)
        padding = tf.fill([batch_bucket, length_bucket - length], tf.constant(config.pad_id))
        padded = tf.concat([tf.gather(source_ids, rows), padding], axis=1)

        compiled = tf.function(
            lambda ids: self._search(ids, beam_size, num_returned, in_place=False),
            jit_compile=True,
        )

        target_ids, scores = self._concurrently(padded, compiled)
        width = loop_bound(
            config,
            length,
            self.length_options.get("max_output_length"),
            self.length_options.get("extra_length", 0),
        )
        return target_ids[:batch, :, :width], scores[:batch]

    def _translate(self, text, beam_size, num_returned):
        """Text `[batch]` -> texts `[batch, num_returned]`, scores, truncated, target ids
        `[batch, num_returned, target_length]` (empty inputs: "" and score 0)."""
        source_ids, empty, truncated = self.encode(text)
        target_ids, scores = self.search(source_ids, beam_size, num_returned)
        shape = tf.shape(target_ids)
        texts = self.tokenizer.detokenize(tf.reshape(target_ids, [-1, shape[2]]))
        texts = tf.reshape(texts, shape[:2])
        empty = empty[:, None]
        target_ids = tf.where(empty[:, :, None], self.tokenizer.pad_id, target_ids)
        return tf.where(empty, "", texts), tf.where(empty, 0.0, scores), truncated, target_ids

    @tf.function(input_signature=[TEXT_SPEC])
    def serving_default(self, text):
        texts, _, truncated, _ = self._translate(text, self.settings.beam_size, 1)
        return {"translations": texts[:, 0], "truncated": truncated}

    @tf.function(input_signature=[TEXT_SPEC])
    def beam(self, text):
        texts, scores, truncated, target_ids = self._translate(
            text, self.settings.beam_size, self.nbest
        )
        return {
            "translations": texts[:, 0],
            "nbest_translations": texts,
            "nbest_scores": scores,
            "nbest_target_ids": target_ids,
            "truncated": truncated,
        }

    @tf.function(input_signature=[TEXT_SPEC])
    def greedy(self, text):
        texts, _, truncated, _ = self._translate(text, 1, 1)
        return {"translations": texts[:, 0], "truncated": truncated}

    def padding_after_eos(self, source_ids: tf.Tensor) -> tf.Tensor:
        """`source_ids` with every id after each row's first eos replaced by `pad_id`.

        TF Serving's batching (`pad_variable_length_inputs`) pads the rows of a shorter request
        with that tensor's first element, a real token; this makes them padding again, so a
        request's results do not depend on the requests it was batched with.
        """
        config = self.model.config
        seen_eos = tf.cumsum(tf.cast(source_ids == config.eos_id, tf.int32), axis=1, exclusive=True)
        return tf.where(seen_eos > 0, tf.constant(config.pad_id, tf.int32), source_ids)

    @tf.function(input_signature=[IDS_SPEC])
    def greedy_ids(self, source_ids):
        target_ids, scores = self.search(self.padding_after_eos(source_ids), 1)
        return {"target_ids": target_ids[:, 0], "scores": scores[:, 0]}

    @tf.function(input_signature=[IDS_SPEC])
    def beam_ids(self, source_ids):
        source_ids = self.padding_after_eos(source_ids)
        target_ids, scores = self.search(source_ids, self.settings.beam_size)
        return {"target_ids": target_ids[:, 0], "scores": scores[:, 0]}

    def signatures(self) -> dict:
        """The SavedModel signatures, name -> `tf.function`; without a tokenizer, ids only."""
        ids = {"greedy_ids": self.greedy_ids, "beam_ids": self.beam_ids}
        if self.tokenizer is None:
            return ids
        text = {"serving_default": self.serving_default, "beam": self.beam, "greedy": self.greedy}
        return {**text, **ids}

    # -- Python list API ---------------------------------------------------------------------
    def translate(
        self, sentences: Sequence[str | bytes], beam_size: int | None = None
    ) -> list[str]:
        """Translations of `sentences`, in order, through the `serving_default` signature.

        Args:
            sentences: `str` (or raw `bytes`, which may be invalid UTF-8) per sentence.
            beam_size: overrides `settings.beam_size` (1 = greedy search); another beam size
                than the settings' traces a separate `Translator`, so pass settings with it
                to reuse one.
        """
        if beam_size is not None and beam_size != self.settings.beam_size:
            settings = dataclasses.replace(self.settings, beam_size=beam_size, nbest=None)
            other = Translator(
                self.model,
                self.tokenizer,
                settings,
                fixed_output_length=self.fixed_output_length,
                jit_compile=self.jit_compile,
            )
            return other.translate(sentences)
        rows = self.run_in_batches(self.serving_default, sentences)
        return [row["translations"].decode("utf-8") for row in rows]

    def translate_nbest(
        self, sentences: Sequence[str | bytes], with_ids: bool = False
    ) -> list[list[tuple]]:
        """The `beam` signature's `settings.nbest` hypotheses per sentence, best first, as
        `(translation, length-penalized log-probability)` pairs, or with `with_ids`
        `(translation, score, target ids up to and including eos)` triples."""
        rows = self.run_in_batches(self.beam, sentences)
        results = []
        for row in rows:
            hypotheses = zip(
                row["nbest_translations"], row["nbest_scores"], row["nbest_target_ids"], strict=True
            )
            results.append(
                [
                    (text.decode("utf-8"), float(score), *([_until_eos(ids, self)] * with_ids))
                    for text, score, ids in hypotheses
                ]
            )
        return results

    def run_in_batches(self, signature, sentences) -> list[dict[str, np.ndarray]]:
        """Runs a text signature on length-sorted batches; one output row per sentence, in order."""
        if isinstance(sentences, (str, bytes)):
            raise TypeError(f"sentences must be a list of sentences, got one: {sentences[:50]!r}")
        sentences = list(sentences)
        if not sentences:
            return []
        text = tf.constant(sentences, tf.string)
        order = np.argsort(self.source_lengths(text).numpy(), kind="stable")
        rows: list[dict[str, np.ndarray]] = [{}] * len(sentences)
        for start in range(0, len(order), self.settings.batch_size):
            batch = order[start : start + self.settings.batch_size]
            outputs = {
                key: value.numpy() for key, value in signature(tf.gather(text, batch)).items()
            }
            for index, row in enumerate(batch):
                rows[row] = {key: value[index] for key, value in outputs.items()}
        return rows


def shard_count(batch_bucket, concurrent_searches):
    """How many shards `Translator` searches a batch of `batch_bucket` rows in: the most, a
    power of two up to `concurrent_searches`, of at least `MIN_SHARD_ROWS` rows each. The XLA
    search's buckets are 1, 2, 4, 8, then multiples of 8, so its shards are equal; op by op
    they differ by a row at most. Int32 scalar tensor."""
    count = tf.constant(1)
    for candidate in CONCURRENT_SEARCHES[1:]:
        if candidate <= concurrent_searches:
            enough = tf.convert_to_tensor(batch_bucket) >= candidate * MIN_SHARD_ROWS
            count = tf.where(enough, candidate, count)
    return count


def _either(condition, then, otherwise):
    """A callable running `tf.cond(condition, then, otherwise)`."""
    return lambda: tf.cond(condition, then, otherwise)


def _until_eos(ids: np.ndarray, translator: Translator) -> list[int]:
    """A hypothesis' ids without the padding after it (eos kept when it was produced)."""
    ids = ids.tolist()
    eos = translator.tokenizer.eos_id
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    while ids and ids[-1] == translator.tokenizer.pad_id:
        ids.pop()
    return ids
