"""A tiny SavedModel with the exported translator's signature names, for serving tests whose case
does not depend on the model: it saves and loads in about a second (a real tiny export takes
tens of seconds to write and several to load), its "translation" is the input's words reversed
and upper-cased, and `call_count` shows how many text calls ran, which no real export can.

What the real export does over gRPC (metadata, n-best, id signatures, warmup, rollout) is
tested on the real export, in test_real_export_grpc.py; this model's n-best is 2 wide and its
outputs are not translations, so it must not stand in for those.
"""

from __future__ import annotations

import os

import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

# Inputs longer than this many bytes are reported as truncated, like a real model's max length.
TRUNCATE_BYTES = 40
# What the serving tests write and configure; here because test modules cannot import conftest.
WARMUP_TEXTS = ["warmup one", "warmup two", "warmup three"]


def fake_translate(text: str) -> str:
    """The translation the fake model returns for `text`, for use in test expectations."""
    return " ".join(reversed(text.split())).upper()


class FakeTranslator(tf.Module):
    """Stands in for the exported Transformer; counts its calls so tests can see warmup."""

    def __init__(self):
        super().__init__()
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False, name="calls")

    def _translate(self, text):
        self.calls.assign_add(1)
        words = tf.strings.split(text)
        starts = tf.gather(words.row_starts(), words.value_rowids())
        lengths = tf.gather(words.row_lengths(), words.value_rowids())
        positions = tf.range(tf.size(words.flat_values, out_type=tf.int64)) - starts
        reversed_words = words.with_flat_values(
            tf.gather(words.flat_values, starts + lengths - 1 - positions)
        )
        translations = tf.strings.upper(
            tf.strings.reduce_join(reversed_words, axis=1, separator=" "), encoding="utf-8"
        )
        return translations, tf.strings.length(text) > TRUNCATE_BYTES

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serving_default(self, text):
        translations, truncated = self._translate(text)
        return {"translations": translations, "truncated": truncated}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def greedy(self, text):
        translations, truncated = self._translate(text)
        return {"translations": translations, "truncated": truncated}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def beam(self, text):
        translations, truncated = self._translate(text)
        nbest = tf.stack([translations, tf.strings.lower(translations, encoding="utf-8")], axis=1)
        batch = tf.shape(text)[0]
        scores = tf.tile(tf.constant([[-1.0, -2.0]]), [batch, 1])
        return {
            "translations": translations,
            "nbest_translations": nbest,
            "nbest_scores": scores,
            "truncated": truncated,
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="source_ids")])
    def greedy_ids(self, source_ids):
        return self._ids(source_ids)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="source_ids")])
    def beam_ids(self, source_ids):
        return self._ids(source_ids)

    def _ids(self, source_ids):
        # Pads (0) stay pads so tests can check that padding is respected.
        not_pad = tf.cast(source_ids != 0, tf.int32)
        target_ids = (source_ids + 1) * not_pad
        scores = -tf.cast(tf.reduce_sum(not_pad, axis=1), tf.float32)
        return {"target_ids": target_ids, "scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def call_count(self, text):
        # Not part of the contract: lets tests see how many text calls (warmup included) ran.
        # One value per row, because TF Serving's batching needs a batch dimension on outputs.
        return {"count": tf.fill(tf.shape(text), self.calls.read_value())}


def warmup_records(texts: list[str], signature: str = "serving_default") -> list[bytes]:
    """Serialized `PredictionLog` records asking `signature` to translate `texts`, one each."""
    records = []
    for text in texts:
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = signature
        request.inputs["text"].CopyFrom(tf.make_tensor_proto([text.encode()], dtype=tf.string))
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        records.append(log.SerializeToString())
    return records


def write_fake_model(
    base_path: str | os.PathLike,
    version: int = 1,
    warmup: list[str] | None = None,
) -> str:
    """Saves the fake translator to `base_path/version`, TF Serving's layout.

    Args:
        base_path: The model's base folder (`BASE/NAME`).
        version: The version folder to write.
        warmup: Texts to write to `assets.extra/tf_serving_warmup_requests`, one request each.

    Returns:
        The version folder.
    """
    module = FakeTranslator()
    version_dir = os.path.join(os.fspath(base_path), str(version))
    signatures = {
        name: getattr(module, name).get_concrete_function()
        for name in ("serving_default", "greedy", "beam", "greedy_ids", "beam_ids", "call_count")
    }
    tf.saved_model.save(module, version_dir, signatures=signatures)
    if warmup:
        extra = os.path.join(version_dir, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(extra, "tf_serving_warmup_requests")) as writer:
            for record in warmup_records(warmup):
                writer.write(record)
    return version_dir
