"""Training throughput (target tokens/s) of the `small` and `base` presets, fp32 and bf16.

Each case compiles the model exactly as `training.train` does (label-smoothed loss, §5.3 Adam,
accuracy and token-count metrics) and runs `model.fit` on fixed-shape batches of random ids
(default 64 sentences x 24 tokens on both sides, no padding), so the numbers compare with a plain
Keras model of the same shapes. The first epoch (tracing, warm-up) is not timed.

    .venv/bin/python benchmarks/training_throughput.py

writes `benchmarks/results/training_throughput.json` and prints a markdown table. Each case
runs in its own process, since the mixed-precision policy is global.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training_throughput.json"
sys.path.insert(0, str(ROOT))

from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402


def run_case(preset, policy, batch_size, length, steps, epochs):
    """Trains `epochs` x `steps`; returns tokens/s of the epochs after the first."""
    quiet_tensorflow()
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_transformer import (
        MaskedLabelSmoothingLoss,
        MaskedTokenAccuracy,
        TransformerConfig,
        build_transformer,
        transformer_optimizer,
    )
    from training.callbacks import TokenCount

    keras.utils.set_random_seed(0)
    if policy != "float32":
        keras.mixed_precision.set_global_policy(policy)
    config = TransformerConfig.preset(preset)
    model = build_transformer(config)
    model.compile(
        optimizer=transformer_optimizer(config.d_model, warmup_steps=4000),
        loss=MaskedLabelSmoothingLoss(config.label_smoothing),
        metrics=[MaskedTokenAccuracy(), TokenCount()],
    )
    rng = np.random.default_rng(0)
    ids = lambda: rng.integers(4, config.vocab_size, (batch_size, length)).astype("int32")  # noqa: E731
    batch = ({"source_ids": ids(), "target_ids": ids()}, ids())
    dataset = tf.data.Dataset.from_tensors(batch).repeat()

    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    # shuffle=False: Keras does not shuffle a tf.data.Dataset; shuffle=True only makes it warn.
    model.fit(
        dataset, epochs=epochs, steps_per_epoch=steps, callbacks=[Timer()], shuffle=False, verbose=0
    )
    timed = times[1:]
    seconds_per_step = sum(timed) / (len(timed) * steps)
    return {
        "preset": preset,
        "policy": policy,
        "batch": f"{batch_size} x {length}",
        "parameters": model.count_params(),
        "seconds_per_step": seconds_per_step,
        "target_tokens_per_second": batch_size * length / seconds_per_step,
        "timed_steps": len(timed) * steps,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.case:
        preset, policy = args.case.split(":")
        result = run_case(preset, policy, args.batch_size, args.length, args.steps, args.epochs)
        print(json.dumps(result))
        return 0
    results = []
    for preset in args.presets.split(","):
        for policy in args.policies.split(","):
            command = [sys.executable, __file__, "--case", f"{preset}:{policy}"]
            command += ["--batch-size", str(args.batch_size), "--length", str(args.length)]
            command += ["--steps", str(args.steps), "--epochs", str(args.epochs)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "benchmark": "training_throughput",
        "command": "python benchmarks/training_throughput.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| preset | policy | batch | target tokens/s |\n|---|---|---|---:|")
    for r in results:
        print(
            f"| {r['preset']} | {r['policy']} | {r['batch']} | "
            f"{r['target_tokens_per_second']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
