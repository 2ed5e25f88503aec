"""`python -m training.average --model-dir DIR [--last N | --best N]`: average checkpoints (§6.1).

The paper's base models average the last 5 checkpoints (written every 10 minutes) and big models
the last 20. Writes `averaged.weights.h5`, which `training.evaluate` and `serving.export` pick
up first by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keras_transformer.translation import model_dir as layout
from quiet_logs import add_verbose_argument


def select_checkpoints(model_dir, last=None, best=None) -> list[Path]:
    """The last N step checkpoints, or the N with the best dev BLEU in `bleu_history.jsonl`."""
    for name, count in (("--last", last), ("--best", best)):
        if count is not None and count < 1:
            raise ValueError(f"{name} must be a positive number of checkpoints, got {count}")
    model_dir = Path(model_dir)
    steps = layout.list_step_checkpoints(model_dir)
    if not steps:
        raise FileNotFoundError(f"No step checkpoints in {model_dir / layout.CHECKPOINTS}")
    if best is not None:
        history = model_dir / layout.EVAL_HISTORY
        scores = {}
        if history.is_file():
            for line in history.read_text().splitlines():
                entry = json.loads(line)
                scores[entry["step"]] = entry["bleu"]
        scored = [(scores[step], step, path) for step, path in steps if step in scores]
        if len(scored) < best:
            raise ValueError(
                f"--best {best} needs {best} checkpoints with a dev BLEU, found {len(scored)} "
                f"(steps with BLEU and a kept checkpoint: {sorted(s for _, s, _ in scored)})"
            )
        return [path for _, _, path in sorted(scored, reverse=True)[:best]]
    count = 5 if last is None else last
    if len(steps) < count:
        raise ValueError(f"--last {count} asks for more checkpoints than the {len(steps)} kept")
    return [path for _, path in steps[-count:]]


def average_checkpoints(model_dir, paths: list[Path], output: Path | None = None) -> Path:
    """Loads each weights file into the model, averages every variable, saves the result."""
    import numpy as np

    model, _ = layout.load_transformer(model_dir, checkpoint=str(paths[0]))
    total = [np.zeros_like(weight, dtype="float64") for weight in model.get_weights()]
    for path in paths:
        model.load_weights(path)
        for accumulator, weight in zip(total, model.get_weights(), strict=True):
            accumulator += weight
    model.set_weights([accumulator / len(paths) for accumulator in total])
    output = Path(output or Path(model_dir) / layout.AVERAGED)
    model.save_weights(output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.average", description=__doc__)
    parser.add_argument("--model-dir", required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--last", type=int, help="average the last N step checkpoints (5)")
    group.add_argument("--best", type=int, help="average the N checkpoints with best dev BLEU")
    parser.add_argument("--output", help="weights file (default: MODEL_DIR/averaged.weights.h5)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        paths = select_checkpoints(args.model_dir, args.last, args.best)
        output = average_checkpoints(args.model_dir, paths, args.output)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(output), "averaged": [str(p) for p in paths]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
