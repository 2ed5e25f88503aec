"""`python -m training.translate --model-dir DIR [SENTENCE ...]`: translate a few sentences.

Sentences come from the arguments, or one per line from standard input. Decoding is the run's
(`decode_settings.json`) through the same `Translator` that `evaluate` scores and the export
serves; `--beam-size`, `--alpha` and `--nbest` override it. Plain output is one translation per
line; `--nbest K` or `--output-ids` print one JSON object per sentence instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from keras_transformer.translation import model_dir as layout
from quiet_logs import add_verbose_argument


def translate_lines(translator, sentences, nbest=None, output_ids=False) -> list[str]:
    """The output lines for `sentences`: plain translations, or JSON objects with hypotheses."""
    if not nbest and not output_ids:
        return translator.translate(sentences)
    lines = []
    for source, hypotheses in zip(
        sentences, translator.translate_nbest(sentences, with_ids=output_ids), strict=True
    ):
        entries = []
        for hypothesis in hypotheses:
            entry = {"translation": hypothesis[0], "score": round(hypothesis[1], 6)}
            if output_ids:
                entry["ids"] = hypothesis[2]
            entries.append(entry)
        lines.append(json.dumps({"source": source, "hypotheses": entries}, ensure_ascii=False))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.translate", description=__doc__)
    parser.add_argument("sentences", nargs="*", help="sentences; none: read stdin lines")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--checkpoint", default="auto", help="auto|averaged|best|final|last|PATH")
    parser.add_argument("--beam-size", type=int, help="1 = greedy (default: the run's)")
    parser.add_argument("--alpha", type=float, help="length penalty (default: the run's)")
    parser.add_argument("--nbest", type=int, help="print the K best hypotheses with scores")
    parser.add_argument("--output-ids", action="store_true", help="print target ids too")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin]
    try:
        run = layout.load_decode_settings(args.model_dir)
        nbest = args.nbest or (1 if args.output_ids else None)
        settings = dataclasses.replace(
            run,
            beam_size=max(args.beam_size or run.beam_size, nbest or 1),
            length_penalty_alpha=run.length_penalty_alpha if args.alpha is None else args.alpha,
            nbest=nbest,
        )
        translator, _ = layout.load_translator(args.model_dir, args.checkpoint, settings)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in translate_lines(translator, sentences, args.nbest, args.output_ids):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
