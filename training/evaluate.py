"""`python -m training.evaluate --model-dir DIR | --saved-model DIR --corpus SPEC`: BLEU.

Translates with the model directory's `Translator` (the module the export saves) or with an
exported SavedModel's own signature, so a published BLEU can be the served artifact's. Prints one
JSON line with cased, detokenized sacreBLEU and its signature plus chrF, and writes the
hypotheses (one per line) next to the model or to `--output`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quiet_logs import add_verbose_argument
from training.corpus import CorpusError

SAVED_MODEL_SIGNATURES = ("serving_default", "beam", "greedy")


def translate_with_model_dir(
    model_dir, sources, checkpoint="auto", precision="float32", **settings_overrides
) -> tuple[list[str], dict]:
    """Hypotheses of the model directory's `Translator` computing in `precision`; decoding
    options left `None` come from its `decode_settings.json`. Returns
    `(hypotheses, description)`."""
    from keras_transformer.translation import model_dir as layout

    settings = layout.load_decode_settings(model_dir).replace(**settings_overrides)
    translator, weights = layout.load_translator(model_dir, checkpoint, settings, precision)
    hypotheses = translator.translate(sources)
    description = {"checkpoint": str(weights), "decode_settings": settings.to_dict()}
    return hypotheses, {**description, "precision": precision}


def translate_with_saved_model(
    saved_model_dir, sources, signature="serving_default", batch_size=None
) -> tuple[list[str], dict]:
    """Hypotheses of an exported SavedModel's text `signature`, `batch_size` sentences per call
    (default: the export's decode settings). Returns `(hypotheses, description)`."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401 - registers the SentencePiece ops of the graph

    saved_model_dir = Path(saved_model_dir)
    record_path = saved_model_dir / "assets.extra" / "export.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    batch_size = batch_size or record.get("decode_settings", {}).get("batch_size", 64)
    if signature not in SAVED_MODEL_SIGNATURES:
        raise ValueError(f"--signature must be one of {SAVED_MODEL_SIGNATURES}, got {signature!r}")
    translate = tf.saved_model.load(str(saved_model_dir)).signatures[signature]
    # Similar lengths share a batch (less padding); results do not depend on the batching.
    order = sorted(range(len(sources)), key=lambda row: len(sources[row].encode("utf-8")))
    hypotheses = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        texts = tf.constant([sources[row] for row in rows], tf.string)
        for row, text in zip(rows, translate(text=texts)["translations"].numpy(), strict=True):
            hypotheses[row] = text.decode("utf-8")
    description = {"saved_model": str(saved_model_dir), "signature": signature, **record}
    return hypotheses, description


def evaluate(
    model_dir,
    corpus_spec,
    source_lang,
    target_lang,
    checkpoint="auto",
    beam_size=None,
    length_penalty_alpha=None,
    batch_size=None,
    limit=None,
    output=None,
    *,
    saved_model=None,
    signature="serving_default",
    precision=None,
) -> dict:
    """Translates `corpus_spec` with `model_dir` or `saved_model` (exactly one) and scores it.

    With `model_dir`, decoding options left `None` come from its `decode_settings.json`; a
    SavedModel decodes as it was exported (only `signature` and `batch_size` apply).
    `precision` (model directories only): `"float32"` (the default) or `"bfloat16"`.
    """
    import sacrebleu

    from training.corpus import corpus_from_config

    if (model_dir is None) == (saved_model is None):
        raise ValueError("give exactly one of --model-dir and --saved-model")
    # Test sets are scored as they are: no length-ratio filter (empty pairs are still dropped
    # and counted in the corpus report).
    corpus = corpus_from_config(
        {"spec": corpus_spec, "max_length_ratio": None},
        source_lang,
        target_lang,
    )
    sources, references = corpus.sources[:limit], corpus.targets[:limit]
    start = time.monotonic()
    if saved_model is not None:
        if beam_size is not None or length_penalty_alpha is not None or precision is not None:
            raise ValueError(
                "a SavedModel decodes as it was exported: choose --signature, not --beam-size, "
                "--alpha or --precision"
            )
        hypotheses, description = translate_with_saved_model(
            saved_model, sources, signature, batch_size
        )
    else:
        hypotheses, description = translate_with_model_dir(
            model_dir,
            sources,
            checkpoint,
            precision or "float32",
            beam_size=beam_size,
            length_penalty_alpha=length_penalty_alpha,
            batch_size=batch_size,
        )
    seconds = time.monotonic() - start
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    default_output = Path(model_dir or saved_model) / f"hypotheses.{target_lang}.txt"
    output = Path(output) if output else default_output
    output.write_text("".join(h + "\n" for h in hypotheses))
    return {
        "bleu": round(bleu_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf_score.score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(sources),
        "corpus": corpus.report(),
        "direction": f"{source_lang}-{target_lang}",
        **description,
        "decode_seconds": round(seconds, 1),
        "hypotheses": str(output),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-dir", help="a training run's directory")
    model.add_argument("--saved-model", help="an export's version folder (BASE/NAME/VERSION)")
    parser.add_argument("--corpus", required=True, help="e.g. text:PREFIX or sgml:PREFIX")
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="de")
    parser.add_argument("--checkpoint", default="auto", help="auto|averaged|best|final|last|PATH")
    parser.add_argument(
        "--signature",
        default="serving_default",
        choices=SAVED_MODEL_SIGNATURES,
        help="with --saved-model: the signature that translates",
    )
    parser.add_argument("--beam-size", type=int, help="1 = greedy (default: the run's)")
    parser.add_argument("--alpha", type=float, help="length penalty alpha (default: the run's)")
    parser.add_argument("--batch-size", type=int, help="sentences per batch (default: the run's)")
    parser.add_argument("--limit", type=int, help="only the first N segments")
    parser.add_argument("--output", help="hypotheses file")
    parser.add_argument(
        "--precision",
        # Checked where models are built (model_dir.PRECISIONS): parsing loads no TensorFlow.
        help="with --model-dir: float32 (default) or bfloat16 matrix products",
    )
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        result = evaluate(
            args.model_dir,
            args.corpus,
            args.source_lang,
            args.target_lang,
            checkpoint=args.checkpoint,
            beam_size=args.beam_size,
            length_penalty_alpha=args.alpha,
            batch_size=args.batch_size,
            limit=args.limit,
            output=args.output,
            saved_model=args.saved_model,
            signature=args.signature,
            precision=args.precision,
        )
    except (FileNotFoundError, CorpusError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
