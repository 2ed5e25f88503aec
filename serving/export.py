"""`python -m serving.export --model-dir DIR --output BASE/NAME/VERSION`: a servable SavedModel.

Signatures take raw strings and return strings; tokenization and detokenization run inside the
graph with the training run's SentencePiece model as an asset. Only core TensorFlow ops and the
SentencePiece ops of tensorflow-text appear, so a stock `tensorflow_model_server` runs it.

Input handling (every case gives a defined result, never a graph error):
- empty or whitespace-only text -> an empty translation;
- bytes that are not valid UTF-8 -> replaced by U+FFFD before tokenization;
- more source tokens than the model takes -> the source is truncated and `truncated` is True;
- a batch of zero strings -> zero results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import tensorflow as tf

from keras_transformer.decoding import beam_search, greedy_search
from keras_transformer.translation import model_dir as layout
from keras_transformer.translation.tokenizer import SubwordTokenizer
from serving.graph_ops import disallowed_ops

WARMUP_SENTENCES = (
    "A man in a blue shirt is standing on a ladder.",
    "Two dogs play in the snow.",
    "",
)
TEXT_SPEC = tf.TensorSpec([None], tf.string, name="text")
IDS_SPEC = tf.TensorSpec([None, None], tf.int32, name="source_ids")


class TranslationModule(tf.Module):
    """A `Transformer` and its tokenizer behind text-in/text-out `tf.function` signatures.

    Args:
        model: a trained `keras_transformer.Transformer`.
        tokenizer: the `SubwordTokenizer` it was trained with.
        beam_size: beams of `serving_default` and `beam`.
        length_penalty_alpha: GNMT length penalty of beam search.
        nbest: hypotheses returned by `beam` (at most `beam_size`).
        extra_length: outputs may be this many tokens longer than their source.
        fixed_output_length: if set, every output has exactly this many tokens (end of
            sentence is ignored): a decoding option for throughput comparisons with other
            engines, not for translation.
    """

    def __init__(
        self,
        model,
        tokenizer,
        beam_size=4,
        length_penalty_alpha=0.6,
        nbest=None,
        extra_length=50,
        fixed_output_length=None,
    ):
        super().__init__(name="translation")
        self.model = model
        self.tokenizer = tokenizer
        self.beam_size = int(beam_size)
        self.length_penalty_alpha = float(length_penalty_alpha)
        self.nbest = int(nbest or beam_size)
        self.extra_length = int(extra_length)
        self.length_options = {"extra_length": self.extra_length}
        if fixed_output_length:
            self.length_options = {
                "max_output_length": int(fixed_output_length),
                "ignore_eos": True,
            }
        # Source tokens plus eos must fit the positional table (decoding caps outputs itself).
        self.max_source_tokens = model.config.max_length - 1
        self.pad_id, self.eos_id = model.config.pad_id, model.config.eos_id

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text):
        """`[batch]` strings -> source ids `[batch, length]` (+eos), empty and truncated flags."""
        text = tf.strings.unicode_transcode(
            text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
        )
        empty = tf.equal(tf.strings.length(tf.strings.strip(text)), 0)
        tokens = self.tokenizer.tokenize(text)
        truncated = tokens.row_lengths() > self.max_source_tokens
        tokens = tokens[:, : self.max_source_tokens]
        eos = tf.fill([tokens.nrows(), 1], tf.constant(self.eos_id, tf.int32))
        tokens = tf.concat([tf.cast(tokens, tf.int32), eos], axis=1)
        return tokens.to_tensor(default_value=self.pad_id), empty, truncated

    def decode_text(self, target_ids, empty):
        texts = self.tokenizer.detokenize(target_ids)
        return tf.where(empty, tf.zeros_like(texts), texts)

    # -- decoding ----------------------------------------------------------------------------
    def _greedy(self, source_ids):
        result = greedy_search(self.model, source_ids, **self.length_options)
        return result["target_ids"], result["scores"]

    def _beam(self, source_ids, num_returned):
        result = beam_search(
            self.model,
            source_ids,
            beam_size=self.beam_size,
            length_penalty_alpha=self.length_penalty_alpha,
            num_returned=num_returned,
            **self.length_options,
        )
        return result["target_ids"], result["scores"]

    def _if_nonempty(self, source_ids, decode, empty_outputs):
        # A batch of zero rows skips decoding: the loop's shapes would be [0, ...] anyway,
        # and a cond makes "zero in, zero out" explicit.
        return tf.cond(tf.shape(source_ids)[0] > 0, lambda: decode(source_ids), empty_outputs)

    @tf.function(input_signature=[TEXT_SPEC])
    def greedy(self, text):
        source_ids, empty, truncated = self.encode(text)
        target_ids, _ = self._if_nonempty(
            source_ids,
            self._greedy,
            lambda: (tf.zeros([0, 1], tf.int32), tf.zeros([0], tf.float32)),
        )
        return {"translations": self.decode_text(target_ids, empty), "truncated": truncated}

    @tf.function(input_signature=[TEXT_SPEC])
    def beam(self, text):
        source_ids, empty, truncated = self.encode(text)
        target_ids, scores = self._if_nonempty(
            source_ids,
            lambda ids: self._beam(ids, self.nbest),
            lambda: (tf.zeros([0, self.nbest, 1], tf.int32), tf.zeros([0, self.nbest])),
        )
        batch, steps = tf.shape(target_ids)[0], tf.shape(target_ids)[2]
        flat = tf.reshape(target_ids, [batch * self.nbest, steps])
        flat_empty = tf.repeat(empty, self.nbest)
        nbest = tf.reshape(self.decode_text(flat, flat_empty), [batch, self.nbest])
        return {
            "translations": nbest[:, 0],
            "nbest_translations": nbest,
            "nbest_scores": scores,
            "truncated": truncated,
        }

    @tf.function(input_signature=[TEXT_SPEC])
    def serving_default(self, text):
        source_ids, empty, truncated = self.encode(text)
        target_ids, _ = self._if_nonempty(
            source_ids,
            lambda ids: self._beam(ids, 1),
            lambda: (tf.zeros([0, 1, 1], tf.int32), tf.zeros([0, 1])),
        )
        return {"translations": self.decode_text(target_ids[:, 0], empty), "truncated": truncated}

    @tf.function(input_signature=[IDS_SPEC])
    def greedy_ids(self, source_ids):
        target_ids, scores = self._if_nonempty(
            source_ids,
            self._greedy,
            lambda: (tf.zeros([0, 1], tf.int32), tf.zeros([0], tf.float32)),
        )
        return {"target_ids": target_ids, "scores": scores}

    @tf.function(input_signature=[IDS_SPEC])
    def beam_ids(self, source_ids):
        target_ids, scores = self._if_nonempty(
            source_ids,
            lambda ids: self._beam(ids, 1),
            lambda: (tf.zeros([0, 1, 1], tf.int32), tf.zeros([0, 1])),
        )
        return {"target_ids": target_ids[:, 0], "scores": scores[:, 0]}

    def signatures(self):
        return {
            "serving_default": self.serving_default,
            "beam": self.beam,
            "greedy": self.greedy,
            "greedy_ids": self.greedy_ids,
            "beam_ids": self.beam_ids,
        }


def write_warmup_requests(version_dir: Path, model_name: str, sentences=WARMUP_SENTENCES):
    """`assets.extra/tf_serving_warmup_requests`: real requests replayed before AVAILABLE."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    folder = version_dir / "assets.extra"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tf_serving_warmup_requests"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature in ("serving_default", "greedy"):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs["text"].CopyFrom(tf.make_tensor_proto(list(sentences), tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def export(
    model_dir,
    output,
    checkpoint="auto",
    beam_size=4,
    length_penalty_alpha=0.6,
    nbest=None,
    model_name=None,
    fixed_output_length=None,
) -> Path:
    """Exports `model_dir` to `output` (`BASE/NAME/VERSION`), atomically.

    The version folder is written under a temporary name beside it and renamed when complete,
    so a server polling `BASE/NAME` never loads a half-written version.
    """
    output = Path(output)
    if not output.name.isdigit():
        raise ValueError(
            f"--output must end in a numeric version folder (BASE/NAME/VERSION), got {output}"
        )
    if output.exists():
        raise FileExistsError(f"{output} exists: versions are immutable, export a new number")
    model_dir = Path(model_dir)
    model, weights = layout.load_transformer(model_dir, checkpoint)
    tokenizer = SubwordTokenizer(model_dir / layout.VOCAB)
    module = TranslationModule(
        model,
        tokenizer,
        beam_size,
        length_penalty_alpha,
        nbest,
        fixed_output_length=fixed_output_length,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        unknown = disallowed_ops(staging)
        if unknown:
            raise ValueError(
                f"The exported graph uses ops a stock model server may lack: {unknown}; "
                "see serving/graph_ops.py"
            )
        write_warmup_requests(staging, model_name or output.parent.name)
        extra = staging / "assets.extra"
        shutil.copy(model_dir / layout.TRANSFORMER_CONFIG, extra / layout.TRANSFORMER_CONFIG)
        (extra / "export.json").write_text(
            json.dumps(
                {
                    "model_dir": str(model_dir),
                    "weights": str(weights),
                    "beam_size": beam_size,
                    "length_penalty_alpha": length_penalty_alpha,
                    "nbest": module.nbest,
                    "max_source_tokens": module.max_source_tokens,
                    "fixed_output_length": fixed_output_length,
                },
                indent=2,
            )
        )
        os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.export", description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--output", required=True, help="BASE/NAME/VERSION")
    parser.add_argument("--checkpoint", default="auto", help="auto|averaged|best|final|last|PATH")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--nbest", type=int, help="hypotheses of the `beam` signature")
    parser.add_argument(
        "--fixed-output-length",
        type=int,
        help="benchmarking only: ignore end of sentence and emit exactly N tokens",
    )
    args = parser.parse_args(argv)
    try:
        path = export(
            args.model_dir,
            args.output,
            args.checkpoint,
            args.beam_size,
            args.alpha,
            args.nbest,
            fixed_output_length=args.fixed_output_length,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"export": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
