"""Where a training step's time goes: a TensorFlow profiler trace, summarised by op.

Compiles the model as `training.train` does (`training.train.compile_model`), runs warm-up
steps on one fixed random batch (the training benchmark's shape), traces `--steps` steps with
`tf.profiler.experimental`, and adds up the kernel time of every op on TensorFlow's compute
threads, by op type and by op. The trace itself is not kept (it is large and specific to this
run); the summary is the table committed as `benchmarks/results/training_profile.md`:

    .venv/bin/python benchmarks/profile_training_step.py --preset small \
        --output benchmarks/results/training_profile.md

Kernel times add up over threads and include profiler overhead, so the shares matter, not the
milliseconds. `ExecutorState::Process` (the executor's own scheduling span, which encloses the
kernels) is left out of the shares.
"""

from __future__ import annotations

import argparse
import collections
import glob
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402

SHAPES = {"small": (64, 24), "base": (32, 32), "tiny": (8, 16)}


def profile(preset, mode, steps, warmup, threads, trace_dir):
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_transformer import TransformerConfig, build_transformer
    from training.run_config import TrainConfig
    from training.train import compile_model

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    keras.utils.set_random_seed(0)
    if mode != "float32":
        keras.mixed_precision.set_global_policy(mode)
    config = TransformerConfig.preset(preset)
    model = build_transformer(config)
    compile_model(model, config, TrainConfig(mixed_precision=None if mode == "float32" else mode))
    rows, length = SHAPES[preset]
    rng = np.random.default_rng(0)
    source = rng.integers(4, config.vocab_size, (rows, length)).astype("int32")
    target = rng.integers(4, config.vocab_size, (rows, length + 1)).astype("int32")
    inputs, labels = {"source_ids": source, "target_ids": target[:, :-1]}, target[:, 1:]
    for _ in range(warmup):
        model.train_on_batch(inputs, labels)
    tf.profiler.experimental.start(str(trace_dir))
    begin = time.perf_counter()
    for _ in range(steps):
        float(model.train_on_batch(inputs, labels, return_dict=True)["loss"])
    seconds = time.perf_counter() - begin
    tf.profiler.experimental.stop()
    return seconds / steps


def op_times(trace_dir):
    """Kernel milliseconds by op type and by op name from the trace's host plane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(path).read_bytes())
    by_type, by_name, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name.startswith("ExecutorState::"):
                    continue
                kind = name.rsplit(":", 1)[-1]
                by_type[kind] += event.duration_ps / 1e9
                by_name[name] += event.duration_ps / 1e9
                counts[kind] += 1
    return by_type, by_name, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mode", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--output", type=Path, help="write the markdown summary here")
    parser.add_argument(
        "--from-trace", help="summarise this earlier trace directory instead of tracing now"
    )
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow()
    if args.from_trace:
        step_seconds = None
        by_type, by_name, counts = op_times(args.from_trace)
    else:
        with tempfile.TemporaryDirectory() as trace_dir:
            step_seconds = profile(
                args.preset, args.mode, args.steps, args.warmup, args.threads, trace_dir
            )
            by_type, by_name, counts = op_times(trace_dir)
    total = sum(by_type.values())
    rows, length = SHAPES[args.preset]
    lines = [
        f"# Training step profile: `{args.preset}`, {args.mode}, {rows}x{length} tokens",
        "",
        f"Command: `python benchmarks/profile_training_step.py --preset {args.preset} "
        f"--mode {args.mode} --steps {args.steps}`, {time.strftime('%Y-%m-%d')}. "
        f"{args.steps} traced steps"
        + (f", {step_seconds:.2f} s per step under the profiler; " if step_seconds else "; ")
        + f"{len(counts)} op types, {sum(counts.values()) // args.steps} kernels per step.",
        "",
        "| op type | share of kernel time | kernels per step |",
        "|---|---:|---:|",
    ]
    for kind, value in by_type.most_common(args.top):
        lines.append(f"| {kind} | {100 * value / total:.1f}% | {counts[kind] // args.steps} |")
    lines += ["", "| op (largest) | share |", "|---|---:|"]
    for name, value in by_name.most_common(args.top):
        lines.append(f"| `{name[:100]}` | {100 * value / total:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
