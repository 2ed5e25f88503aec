"""`python -m serving.export --model-dir DIR --output BASE/NAME/VERSION`: a servable SavedModel.

The SavedModel is a `keras_transformer.translation.translator.Translator` (model, tokenizer and
decode settings; see its docstring for the signatures and how awkward input is handled) saved
with its signatures, so the served graph is the one `training.evaluate` scores. Signatures take
raw strings and return strings; tokenization and detokenization run inside the graph with the
run's SentencePiece model as an asset. Only core TensorFlow ops and the SentencePiece ops of
tensorflow-text appear, so a stock `tensorflow_model_server` runs it.

Decoding defaults come from the model directory's `decode_settings.json` (the run config's
`decode:` section); flags override them, and `assets.extra/export.json` records what was used.
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

from keras_transformer.translation import model_dir as layout
from keras_transformer.translation.translator import (
    CONCURRENT_SEARCHES,
    DEFAULT_CONCURRENT_SEARCHES,
)
from quiet_logs import add_verbose_argument
from serving.graph_ops import disallowed_ops

WARMUP_SENTENCES = (
    "A man in a blue shirt is standing on a ladder.",
    "Two dogs play in the snow.",
    "",
)


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
    *,
    beam_size=None,
    length_penalty_alpha=None,
    nbest=None,
    extra_length=None,
    model_name=None,
    fixed_output_length=None,
    precision="float32",
    jit_compile=False,
    concurrent_searches=DEFAULT_CONCURRENT_SEARCHES,
) -> Path:
    """Exports `model_dir`'s `Translator` to `output` (`BASE/NAME/VERSION`), atomically.

    Decoding options left `None` come from `load_decode_settings(model_dir)`. The version folder
    is written under a temporary name beside it and renamed when complete, so a server polling
    `BASE/NAME` never loads a half-written version. `precision` `"bfloat16"` computes in
    bfloat16 with float32 weights (`layout.load_transformer`); score it before serving it.
    `jit_compile` compiles the searches with XLA (`Translator`): serve it with
    `--xla_cpu_compilation_enabled=true`. `concurrent_searches` splits a batch into shards
    searched at the same time (`Translator`).
    """
    output = Path(output)
    if not output.name.isdigit():
        raise ValueError(
            f"--output must end in a numeric version folder (BASE/NAME/VERSION), got {output}"
        )
    if output.exists():
        raise FileExistsError(f"{output} exists: versions are immutable, export a new number")
    model_dir = Path(model_dir)
    settings = layout.load_decode_settings(model_dir).replace(
        beam_size=beam_size,
        length_penalty_alpha=length_penalty_alpha,
        nbest=nbest,
        extra_length=extra_length,
    )
    translator, weights = layout.load_translator(
        model_dir,
        checkpoint,
        settings,
        precision,
        fixed_output_length=fixed_output_length,
        jit_compile=jit_compile,
        concurrent_searches=concurrent_searches,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        tf.saved_model.save(translator, str(staging), signatures=translator.signatures())
        unknown = disallowed_ops(staging)
        if unknown:
            raise ValueError(
                f"The exported graph uses ops a stock model server may lack: {unknown}; "
                "see serving/graph_ops.py"
            )
        write_warmup_requests(staging, model_name or output.parent.name)
        extra = staging / "assets.extra"
        shutil.copy(model_dir / layout.TRANSFORMER_CONFIG, extra / layout.TRANSFORMER_CONFIG)
        record = {"model_dir": str(model_dir), "weights": str(weights), **translator.describe()}
        (extra / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.export", description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--output", required=True, help="BASE/NAME/VERSION")
    parser.add_argument("--checkpoint", default="auto", help="auto|averaged|best|final|last|PATH")
    parser.add_argument("--beam-size", type=int, help="default: the run's decode settings")
    parser.add_argument("--alpha", type=float, help="length penalty alpha (default: the run's)")
    parser.add_argument("--nbest", type=int, help="hypotheses of the `beam` signature")
    parser.add_argument("--extra-length", type=int, help="outputs may be this much longer")
    parser.add_argument(
        "--fixed-output-length",
        type=int,
        help="benchmarking only: ignore end of sentence and emit exactly N tokens",
    )
    parser.add_argument(
        "--precision",
        choices=layout.PRECISIONS,
        default="float32",
        help="bfloat16: float32 weights, bfloat16 matrix products (faster on CPUs with "
        "AVX512_BF16 or AMX; translations may differ from float32's: compare BLEU first)",
    )
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile each search with XLA (3-4x faster for single sentences on a CPU); "
        "tensorflow_model_server then needs --xla_cpu_compilation_enabled=true, and "
        "translations may differ from the op-by-op graph's in rare ties (see README)",
    )
    parser.add_argument(
        "--concurrent-searches",
        type=int,
        default=DEFAULT_CONCURRENT_SEARCHES,
        choices=CONCURRENT_SEARCHES,
        help="search a batch as up to N shards at once (of 4 rows or more; with "
        "--jit-compile, of its shape bucket); results are unchanged (default "
        f"{DEFAULT_CONCURRENT_SEARCHES}, one per core of the 2-core CPU it was measured on)",
    )
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        path = export(
            args.model_dir,
            args.output,
            args.checkpoint,
            beam_size=args.beam_size,
            length_penalty_alpha=args.alpha,
            nbest=args.nbest,
            extra_length=args.extra_length,
            fixed_output_length=args.fixed_output_length,
            precision=args.precision,
            jit_compile=args.jit_compile,
            concurrent_searches=args.concurrent_searches,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"export": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
