"""Checkpoint averaging window, length penalty and beam size of a finished run, chosen on `val`.

For each `--last N` (the last N step checkpoints averaged, `training.average`), each length
penalty alpha and each beam size (`--beam-sizes`; by default the run's `decode_settings.json`
beam), translates the dev corpus and scores it with sacreBLEU; the test sets are not read.
Writes one JSON: every cell and the best one.

    .venv/bin/python benchmarks/averaging_study.py runs/multi30k_en_de_small \
        --last 5,10,20 --alphas 0.6,1.0 --output benchmarks/results/averaging_study_DATE.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402


def _numbers(text: str, kind):
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from error
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--dev", default="text:../shared/data/multi30k/val")
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="de")
    parser.add_argument("--last", type=lambda t: _numbers(t, int), default=[5, 10, 20])
    parser.add_argument("--alphas", type=lambda t: _numbers(t, float), default=[0.6, 1.0])
    parser.add_argument(
        "--beam-sizes",
        type=lambda t: _numbers(t, int),
        default=[None],
        help="comma-separated beam sizes (default: the run's decode_settings.json beam)",
    )
    parser.add_argument("--limit", type=int, help="only the first N dev segments (smoke tests)")
    parser.add_argument("--output", type=Path, required=True)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    bad = [size for size in args.beam_sizes if size is not None and size < 1]
    if bad:
        parser.error(f"--beam-sizes must be at least 1, got {bad[0]}")
    quiet_tensorflow()

    from training.average import average_checkpoints, select_checkpoints
    from training.evaluate import evaluate

    cells = []
    for last in args.last:
        paths = select_checkpoints(args.model_dir, last=last)
        weights = average_checkpoints(
            args.model_dir, paths, args.model_dir / f"study_last{last}.weights.h5"
        )
        for alpha in args.alphas:
            for beam in args.beam_sizes:
                name = f"study_last{last}_alpha{alpha}" + (f"_beam{beam}" if beam else "")
                result = evaluate(
                    args.model_dir,
                    args.dev,
                    args.source_lang,
                    args.target_lang,
                    checkpoint=str(weights),
                    beam_size=beam,
                    length_penalty_alpha=alpha,
                    limit=args.limit,
                    output=args.model_dir / f"{name}.{args.target_lang}.txt",
                )
                cell = {
                    "last": last,
                    "alpha": alpha,
                    "beam_size": result["decode_settings"]["beam_size"],
                    "checkpoint_steps": [p.name for p in paths],
                    **{k: result[k] for k in ("bleu", "bleu_signature", "chrf", "sentences")},
                    "decoding": result["decode_settings"],
                }
                shown = ("last", "alpha", "beam_size", "bleu", "chrf")
                print(json.dumps({k: cell[k] for k in shown}), flush=True)
                cells.append(cell)
    best = max(cells, key=lambda cell: cell["bleu"])
    record = {
        "benchmark": "averaging_study",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model_dir": str(args.model_dir),
        "dev": args.dev,
        "dev_segments": cells[0]["sentences"],
        "cells": cells,
        "best_on_dev": {k: best[k] for k in ("last", "alpha", "beam_size", "bleu")},
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
