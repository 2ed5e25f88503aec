"""`python -m training.curves --model-dir DIR`: training curves of a run as PNGs.

Reads the run's own logs: `progress.jsonl` (one entry per progress line: loss, token accuracy,
learning rate, target tokens/s, elapsed seconds) and `bleu_history.jsonl` (dev BLEU), and writes
`curves_by_step.png` and `curves_by_time.png` (each: loss, accuracy, learning rate, tokens/s and
dev BLEU) into `MODEL_DIR/curves/` or `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from keras_transformer.translation import model_dir as layout
from quiet_logs import add_verbose_argument

PANELS = (
    ("loss", "training loss"),
    ("token_accuracy", "token accuracy"),
    ("learning_rate", "learning rate"),
    ("target_tokens_per_second", "target tokens/s"),
    ("bleu", "dev BLEU (greedy)"),
)


def read_log(path: Path) -> list[dict]:
    """JSON lines of a log, one entry per step: a resumed run logs again the steps after its
    last backup, and the later entry is the one the run continued from."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_step[entry["step"]] = entry
    return [by_step[step] for step in sorted(by_step)]


def curves(model_dir) -> dict[str, dict[str, np.ndarray]]:
    """`{panel: {"step": ..., "seconds": ..., "value": ...}}` of the run in `model_dir`.

    Dev BLEU's wall-clock time is interpolated from the progress entries around its step.
    """
    model_dir = Path(model_dir)
    progress = read_log(model_dir / layout.PROGRESS)
    if not progress:
        raise FileNotFoundError(
            f"No training progress in {model_dir / layout.PROGRESS}: train the run first "
            "(runs written before progress.jsonl existed have none)"
        )
    steps = np.array([entry["step"] for entry in progress], "float64")
    seconds = np.array([entry["elapsed_seconds"] for entry in progress], "float64")
    result = {}
    for key, _ in PANELS[:-1]:
        values = np.array([entry[key] for entry in progress], "float64")
        result[key] = {"step": steps, "seconds": seconds, "value": values}
    bleu = read_log(model_dir / layout.EVAL_HISTORY)
    bleu_steps = np.array([entry["step"] for entry in bleu], "float64")
    result["bleu"] = {
        "step": bleu_steps,
        "seconds": np.interp(bleu_steps, steps, seconds),
        "value": np.array([entry["bleu"] for entry in bleu], "float64"),
    }
    return result


def curve_figures(data: dict) -> dict:
    """Matplotlib figures `{"curves_by_step": Figure, "curves_by_time": Figure}`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    for axis_key, label, stem in (
        ("step", "optimizer step", "curves_by_step"),
        ("seconds", "training time (minutes)", "curves_by_time"),
    ):
        figure, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
        for axis, (key, title) in zip(axes, PANELS, strict=True):
            x = data[key][axis_key] / (60.0 if axis_key == "seconds" else 1.0)
            axis.plot(x, data[key]["value"], marker="o" if key == "bleu" else None, ms=3)
            axis.set_title(title)
            axis.set_xlabel(label)
            axis.grid(alpha=0.3)
        figure.tight_layout()
        figures[stem] = figure
    return figures


def write_curves(model_dir, output_dir=None) -> list[str]:
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir or Path(model_dir) / "curves")
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, figure in curve_figures(curves(model_dir)).items():
        path = output_dir / f"{stem}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(str(path))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.curves", description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--output-dir", help="default: MODEL_DIR/curves")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        written = write_curves(args.model_dir, args.output_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"figures": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
