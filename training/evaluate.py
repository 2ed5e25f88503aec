"""`python -m training.evaluate --model-dir DIR --corpus SPEC`: translate a test set, score it.

Prints one JSON line with cased, detokenized sacreBLEU and its signature plus chrF, and writes
the hypotheses (one per line) next to the model or to `--output`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from keras_transformer.translation import model_dir as layout
from training.corpus import CorpusError


def evaluate(
    model_dir,
    corpus_spec,
    source_lang,
    target_lang,
    checkpoint="auto",
    beam_size=4,
    length_penalty_alpha=0.6,
    batch_size=64,
    limit=None,
    output=None,
) -> dict:
    import sacrebleu

    from keras_transformer.translation.tokenizer import SubwordTokenizer
    from keras_transformer.translation.translator import Translator
    from training.corpus import corpus_from_config

    model_dir = Path(model_dir)
    model, weights = layout.load_transformer(model_dir, checkpoint)
    tokenizer = SubwordTokenizer(model_dir / layout.VOCAB)
    # Test sets are scored as they are: no length-ratio filter (empty pairs are still dropped
    # and counted in the corpus report).
    corpus = corpus_from_config(
        {"spec": corpus_spec, "max_length_ratio": None},
        source_lang,
        target_lang,
    )
    sources, references = corpus.sources[:limit], corpus.targets[:limit]
    translator = Translator(
        model,
        tokenizer,
        beam_size=beam_size,
        length_penalty_alpha=length_penalty_alpha,
        batch_size=batch_size,
    )
    start = time.monotonic()
    hypotheses = translator.translate(sources)
    seconds = time.monotonic() - start
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    output = Path(output) if output else model_dir / f"hypotheses.{target_lang}.txt"
    output.write_text("".join(h + "\n" for h in hypotheses))
    return {
        "bleu": round(bleu_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf_score.score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(sources),
        "corpus": corpus.report(),
        "direction": f"{source_lang}-{target_lang}",
        "checkpoint": str(weights),
        "decoding": "greedy"
        if beam_size == 1
        else f"beam {beam_size}, alpha {length_penalty_alpha}",
        "decode_seconds": round(seconds, 1),
        "hypotheses": str(output),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--corpus", required=True, help="e.g. text:PREFIX or sgml:PREFIX")
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="de")
    parser.add_argument("--checkpoint", default="auto", help="auto|averaged|best|final|last|PATH")
    parser.add_argument("--beam-size", type=int, default=4, help="1 = greedy search")
    parser.add_argument("--alpha", type=float, default=0.6, help="length penalty alpha")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="only the first N segments")
    parser.add_argument("--output", help="hypotheses file")
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
        )
    except (FileNotFoundError, CorpusError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
