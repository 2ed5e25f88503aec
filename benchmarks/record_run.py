"""Records a finished training run in `benchmarks/results/`: config, steps, dev and test BLEU.

    .venv/bin/python benchmarks/record_run.py runs/multi30k_en_de_small \
        --output benchmarks/results/multi30k_en_de_small_main_job_DATE.json \
        --command "./main_job.sh" --conditions "machine otherwise idle" \
        --compare benchmarks/results/multi30k_en_de_small_main_job_2026-12-02.json

reads what the run wrote in its model directory (`run_config.yaml`, `complete.json`,
`bleu_history.jsonl`, `progress.jsonl`, and `test_2016_flickr.json` from `main_job.sh`) and
writes one JSON. A run stopped by hand (no `complete.json`) is recorded with `--stopped
"why"`: what it logged until then, and the reason. `--compare` adds the loss and token
accuracy of both runs at the steps both logged (training loss per real target token, so runs
with different padding compare).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record(model_dir: Path, stopped: str | None = None) -> dict:
    complete = model_dir / "complete.json"
    if stopped:
        finished = {"stopped_by_hand": stopped}
    elif complete.is_file():
        finished = {"complete": json.loads(complete.read_text())}
    else:
        raise SystemExit(
            f"{model_dir} has no complete.json: the run has not finished (a run stopped by "
            "hand is recorded with --stopped REASON)"
        )
    result = {
        "run_config": yaml.safe_load((model_dir / "run_config.yaml").read_text()),
        **finished,
        "dev_bleu_history": _jsonl(model_dir / "bleu_history.jsonl"),
        "progress": _jsonl(model_dir / "progress.jsonl"),
    }
    test = model_dir / "test_2016_flickr.json"
    if test.is_file():
        result["test_2016_flickr"] = json.loads(test.read_text())
    return result


def loss_at_equal_steps(progress: list[dict], other: list[dict]) -> list[dict]:
    """Loss and accuracy of both runs at every step both logged."""
    theirs = {entry["step"]: entry for entry in other}
    rows = []
    for entry in progress:
        if entry["step"] in theirs:
            before = theirs[entry["step"]]
            rows.append(
                {
                    "step": entry["step"],
                    "loss": entry["loss"],
                    "loss_compared": before["loss"],
                    "token_accuracy": entry["token_accuracy"],
                    "token_accuracy_compared": before["token_accuracy"],
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--command", required=True, help="the command that made the run")
    parser.add_argument("--conditions", default="", help="what else ran on the machine")
    parser.add_argument("--compare", type=Path, help="an earlier record of this script's form")
    parser.add_argument("--stopped", help="why the run was stopped by hand before it finished")
    args = parser.parse_args(argv)
    report = {
        "benchmark": "training_run",
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": args.command,
        "conditions": args.conditions,
        "model_dir": str(args.model_dir),
        **record(args.model_dir, args.stopped),
    }
    if args.compare:
        other = json.loads(args.compare.read_text())
        report["compared_with"] = str(args.compare)
        report["loss_at_equal_steps"] = loss_at_equal_steps(
            report["progress"], other.get("progress", [])
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    if "complete" in report:
        complete = report["complete"]
        print(f"{complete['steps']} steps ({complete['reason']}, {complete['train_seconds']} s)")
    else:
        steps = report["progress"][-1]["step"] if report["progress"] else 0
        print(f"stopped by hand after step {steps}: {args.stopped}")
    for entry in report["dev_bleu_history"]:
        print(f"dev BLEU at step {entry['step']}: {entry['bleu']}")
    if "test_2016_flickr" in report:
        print(f"test_2016_flickr BLEU: {report['test_2016_flickr']['bleu']}")
    for row in report.get("loss_at_equal_steps", []):
        print(
            f"step {row['step']}: loss {row['loss']:.3f} (compared {row['loss_compared']:.3f}), "
            f"accuracy {row['token_accuracy']:.3f} ({row['token_accuracy_compared']:.3f})"
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
