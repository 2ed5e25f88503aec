"""GPU training throughput (target tokens/s) of the project's Transformer on JAX, measured side by
side with the references of `../shared/perf/gpu_anchor.py` (plain Keras 3 on JAX;
`torch.nn.Transformer` with `torch.compile`) in one run.

Ours is the model `training.train` trains: `build_transformer`, `MaskedLabelSmoothingLoss`,
`transformer_optimizer` and `MaskedTokenAccuracy`, compiled as there (without `TokenCount`, which
lives in `training/` and imports TensorFlow; the GPU machine has none), trained with `model.fit`
on pre-tokenized numpy batches of random ids (no padding) under `KERAS_BACKEND=jax`. The warm-up
steps (XLA compilation) run in a `fit` call of their own; the timed steps are one epoch of a
second call, clocked from its start to the completion of its last update.

Absolute speeds on shared machines drift, so the claim is the ratio to a reference measured in
the same run: rounds alternate reference, ours, reference, ours, each in a fresh process (so each
has the whole accelerator), and the best round of each is compared. A ratio is only given when
the reference ran the same shapes and precision (the anchor knows two shapes: Transformer-base
with 768 x 32 tokens per side, and a tiny one for CPU checks). The goal is at least 1.3x the
`torch.compile` reference.

    python benchmarks/gpu_training.py                          # base, 768 x 32, bf16, on a GPU
    KERAS_BACKEND=jax python benchmarks/gpu_training.py --preset tiny --batch 8 --length 8 \
        --steps 3 --impls ours,torch-compile --output /tmp/gpu_training.json   # CPU check

writes `benchmarks/results/gpu_training.json` (or `--output`) and prints a markdown table.
References that cannot run (torch not installed, anchor missing or failing) are reported as
skipped or failed with the reason, never estimated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_training.json"
ANCHOR = ROOT / ".." / "shared" / "perf" / "gpu_anchor.py"

OURS = "ours"
# The implementations gpu_anchor.py measures that this benchmark can ask for (its `--only`).
REFERENCES = ("torch-compile", "torch-eager", "keras-jax")
NEEDS_TORCH = ("torch-compile", "torch-eager")
GOAL_REFERENCE, GOAL_RATIO = "torch-compile", 1.3
# The anchor's precision (bf16 autocast / mixed_bfloat16) and, as its README states, its
# full-size shape: Transformer-base, 768 sentences x 32 tokens per side. Any other run of ours
# is set beside the anchor's tiny shape; the shapes each side reports decide if they compare.
REFERENCE_DTYPE = "mixed_bfloat16"
FULL_REFERENCE_RUN = ("base", {}, 768, 32)
SHAPE_KEYS = ("V", "D", "H", "FF", "N", "B", "L")


# -- ours (runs in its own process: `--worker`) -----------------------------------------------
def shape_of(config, batch: int, length: int) -> dict:
    """The anchor's shape keys for our model; N is a pair when the stacks differ in depth."""
    layers = config.num_encoder_layers
    if config.num_decoder_layers != layers:
        layers = [config.num_encoder_layers, config.num_decoder_layers]
    return dict(
        V=config.vocab_size,
        D=config.d_model,
        H=config.num_heads,
        FF=config.ffn_dim,
        N=layers,
        B=batch,
        L=length,
    )


def build_ours(preset, overrides, length, rows, dtype):
    """Our model compiled as `training.train` compiles it, and `rows` rows of random ids.

    Returns `(model, config, x, y)`; `x` and `y` are numpy arrays `[rows, length]` without
    padding or special tokens, for `model.fit`.
    """
    import keras
    import numpy as np

    from keras_transformer import (
        MaskedLabelSmoothingLoss,
        MaskedTokenAccuracy,
        TransformerConfig,
        build_transformer,
        transformer_optimizer,
    )

    if keras.config.backend() != "jax":
        raise RuntimeError(
            f"this benchmark measures the JAX backend, but KERAS_BACKEND is "
            f"{keras.config.backend()!r}"
        )
    keras.utils.set_random_seed(0)
    if dtype != "float32":
        keras.mixed_precision.set_global_policy(dtype)
    config = TransformerConfig.preset(preset, **overrides)
    if length > config.max_length:
        raise ValueError(f"--length {length} exceeds the model's max_length {config.max_length}")
    model = build_transformer(config)
    model.compile(
        optimizer=transformer_optimizer(config.d_model, warmup_steps=4000),
        loss=MaskedLabelSmoothingLoss(config.label_smoothing, pad_id=config.pad_id),
        metrics=[MaskedTokenAccuracy(pad_id=config.pad_id)],
    )
    rng = np.random.default_rng(0)
    first_id = max(config.pad_id, config.bos_id, config.eos_id) + 1  # no padding, no specials

    def ids():
        return rng.integers(first_id, config.vocab_size, (rows, length)).astype("int32")

    x, y = {"source_ids": ids(), "target_ids": ids()}, ids()
    return model, config, x, y


def wait_for_updates(model):
    """`fit` dispatches steps asynchronously: a clock stops when the last update is done."""
    import jax

    jax.block_until_ready([v.value for v in model.trainable_variables])


def measure_ours(preset, overrides, batch, length, steps, warmup_steps, dtype) -> dict:
    """Trains `warmup_steps` untimed then `steps` timed steps; returns what it measured."""
    import jax
    import keras
    import numpy as np

    rows = max(steps, warmup_steps) * batch
    model, config, x, y = build_ours(preset, overrides, length, rows, dtype)

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            wait_for_updates(model)
            self.seconds = time.perf_counter() - self.start

    fit = dict(batch_size=batch, epochs=1, shuffle=False, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, steps_per_epoch=warmup_steps, **fit)
    wait_for_updates(model)
    warmup_seconds = time.perf_counter() - start
    clock = EpochClock()
    history = model.fit(x, y, steps_per_epoch=steps, callbacks=[clock], **fit)
    loss = float(history.history["loss"][-1])
    if not np.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} after {warmup_steps + steps} steps")
    devices = jax.devices()
    return {
        "backend": keras.config.backend(),
        "jax_version": jax.__version__,
        "keras_version": keras.__version__,
        "devices": [str(device) for device in devices],
        "device_kind": devices[0].device_kind,
        "dtype": dtype,
        "shape": shape_of(config, batch, length),
        "parameters": model.count_params(),
        "warmup_steps": warmup_steps,
        "warmup_s": warmup_seconds,
        "timed_steps": steps,
        "step_s": clock.seconds / steps,
        "target_tokens_per_s": batch * length * steps / clock.seconds,
        "loss": loss,
    }


def run_ours(args, env) -> dict:
    command = [sys.executable, __file__, "--worker", "--preset", args.preset]
    command += [f"--set={key}={json.dumps(value)}" for key, value in args.overrides.items()]
    command += ["--batch", str(args.batch), "--length", str(args.length)]
    command += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    command += ["--dtype", args.dtype]
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s (--timeout)"}
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {result.stderr[-2000:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the references (gpu_anchor.py, run as its docstring says) ---------------------------------
def run_anchor(anchor: Path, only: list[str], tiny: bool, steps: int, env, timeout) -> dict:
    """One run of `gpu_anchor.py --only ...`; returns its JSON plus `"output_tail"`."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(anchor), "--only", ",".join(only), "--steps", str(steps)]
        command += ["--out", out] + (["--tiny"] if tiny else [])
        try:
            result = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s (--timeout)", "output_tail": ""}
        path = Path(out) / "gpu_anchor.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
    report["output_tail"] = (result.stdout + result.stderr)[-2000:]
    if result.returncode != 0:
        report["error"] = f"gpu_anchor.py exited with {result.returncode}"
    return report


def reference_entries(report: dict, name: str) -> dict:
    """The anchor's results for `name`: keras-jax also reports a flash-attention variant."""
    names = [name, name + "-flash"] if name == "keras-jax" else [name]
    return {n: report[n] for n in names if isinstance(report.get(n), dict)}


# -- comparison ---------------------------------------------------------------------------------
def compare(ours: dict | None, references: dict, dtype: str) -> tuple[dict, dict]:
    """Ratios of our best tokens/s to each measured reference, and the goal's verdict.

    Args:
        ours: `{"shape": {...}, "target_tokens_per_s": best}` or `None` when not measured.
        references: name -> `{"status", "shape", "target_tokens_per_s", ...}`.
        dtype: our mixed-precision policy (the references run bf16).

    Returns:
        `(ratios, goal)`: name -> `{"ratio": float}` or `{"ratio": None, "reason": str}`, and
        `{"reference", "min_ratio", "ratio", "met", "reason"?}`.
    """
    ratios = {}
    for name, reference in references.items():
        if ours is None or ours.get("target_tokens_per_s") is None:
            ratios[name] = {"ratio": None, "reason": "ours was not measured"}
        elif reference["status"] != "measured":
            ratios[name] = {"ratio": None, "reason": f"reference {reference['status']}"}
        elif reference["shape"] != ours["shape"]:
            ratios[name] = {
                "ratio": None,
                "reason": f"shapes differ: reference {reference['shape']}, ours {ours['shape']}",
            }
        elif dtype != REFERENCE_DTYPE:
            ratios[name] = {
                "ratio": None,
                "reason": f"precision differs: reference {REFERENCE_DTYPE}, ours {dtype}",
            }
        else:
            ratios[name] = {"ratio": ours["target_tokens_per_s"] / reference["target_tokens_per_s"]}
    goal = {"reference": GOAL_REFERENCE, "min_ratio": GOAL_RATIO, "ratio": None, "met": None}
    verdict = ratios.get(GOAL_REFERENCE)
    if verdict is None:
        goal["reason"] = f"{GOAL_REFERENCE} was not requested (--impls)"
    elif verdict["ratio"] is None:
        goal["reason"] = verdict["reason"]
    else:
        goal["ratio"] = verdict["ratio"]
        goal["met"] = verdict["ratio"] >= GOAL_RATIO
    return ratios, goal


def best(rounds: list[float | None]) -> float | None:
    measured = [value for value in rounds if value is not None]
    return max(measured) if measured else None


# -- driver ---------------------------------------------------------------------------------------
def worker_env(environ) -> dict:
    """The environment of the measuring processes: the JAX backend, this repository importable.

    The caller's PYTHONPATH is kept after the repository (on the GPU machine Keras itself is
    installed with `pip --target` and found through it).
    """
    path = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p)
    env = dict(environ, KERAS_BACKEND="jax", PYTHONPATH=path)
    # The same share of accelerator memory the anchor gives its Keras-on-JAX reference.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")
    return env


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (a TransformerConfig field), got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def add_model_arguments(parser, steps: int, steps_help: str):
    """The arguments that pick our model and its batches (`build_ours`), shared with
    `profile_gpu_step.py`; `check_counts` checks them after parsing."""
    parser.add_argument("--preset", default="base", help="TransformerConfig preset (base)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TransformerConfig field of the preset (repeatable)",
    )
    parser.add_argument("--batch", type=int, default=768, help="sentences per step")
    parser.add_argument("--length", type=int, default=32, help="tokens per side")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps (ours)")
    parser.add_argument("--dtype", default=REFERENCE_DTYPE, choices=("float32", REFERENCE_DTYPE))


def check_counts(parser, args, names=("batch", "length", "steps", "warmup_steps")):
    """Parses `--set` and refuses a count below 1, naming the flag and the value."""
    args.overrides = parse_overrides(args.overrides)
    for name in names:
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, steps=20, steps_help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="reference/ours alternations")
    parser.add_argument(
        "--impls",
        default=",".join((OURS, "keras-jax", "torch-compile")),
        help=f"comma-separated, from {(OURS,) + REFERENCES}",
    )
    parser.add_argument("--anchor", type=Path, default=ANCHOR, help="path of gpu_anchor.py")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per process")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.impls = [name for name in args.impls.split(",") if name]
    unknown = sorted(set(args.impls) - {OURS, *REFERENCES})
    if unknown:
        parser.error(f"unknown --impls {unknown}; choose from {(OURS,) + REFERENCES}")
    check_counts(parser, args, ("batch", "length", "steps", "warmup_steps", "rounds"))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        result = measure_ours(
            args.preset,
            args.overrides,
            args.batch,
            args.length,
            args.steps,
            args.warmup_steps,
            args.dtype,
        )
        print(json.dumps(result))
        return 0

    env = worker_env(os.environ)
    tiny_reference = (args.preset, args.overrides, args.batch, args.length) != FULL_REFERENCE_RUN

    references = {}
    wanted = [name for name in args.impls if name != OURS]
    for name in wanted:
        if not args.anchor.is_file():
            references[name] = {"status": "skipped", "reason": f"{args.anchor} not found"}
        elif name in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
            references[name] = {
                "status": "skipped",
                "reason": f"torch is not installed for {sys.executable}",
            }
    runnable = [name for name in wanted if name not in references]
    # The matmul ceiling (needs torch, no-op without CUDA) lets the anchor report MFU.
    only = (["ceiling"] if any(n in NEEDS_TORCH for n in runnable) else []) + runnable

    anchor_rounds, our_rounds = [], []
    for round_index in range(args.rounds):
        if runnable:
            report = run_anchor(args.anchor, only, tiny_reference, args.steps, env, args.timeout)
            anchor_rounds.append(report)
            print(f"round {round_index + 1} references: {json.dumps(report)[:1000]}", flush=True)
        if OURS in args.impls:
            our_rounds.append(run_ours(args, env))
            print(f"round {round_index + 1} ours: {json.dumps(our_rounds[-1])}", flush=True)

    for name in runnable:
        per_round = [reference_entries(report, name) for report in anchor_rounds]
        variants = sorted({variant for entries in per_round for variant in entries})
        if not variants:
            errors = [
                r.get(f"{name}_error") or r.get("error")
                for r in anchor_rounds
                if r.get(f"{name}_error") or r.get("error")
            ]
            references[name] = {
                "status": "failed",
                "reason": errors[-1] if errors else "gpu_anchor.py reported no result",
                "output_tail": anchor_rounds[-1]["output_tail"],
            }
        for variant in variants:
            config = anchor_rounds[0].get("config", {})
            rounds = [entries.get(variant, {}).get("tgt_tokens_per_s") for entries in per_round]
            references[variant] = {
                "status": "measured",
                "shape": {key: config.get(key) for key in SHAPE_KEYS},
                "dtype": REFERENCE_DTYPE,
                "rounds_target_tokens_per_s": rounds,
                "target_tokens_per_s": best(rounds),
                "mfu_vs_measured_matmul": best(
                    [
                        entries.get(variant, {}).get("mfu_vs_measured_matmul")
                        for entries in per_round
                    ]
                ),
            }

    ours = None
    if OURS in args.impls:
        measured = [r for r in our_rounds if "error" not in r]
        rounds = [r.get("target_tokens_per_s") for r in our_rounds]
        ours = {
            "status": "measured" if measured else "failed",
            "shape": measured[0]["shape"] if measured else None,
            "dtype": args.dtype,
            "rounds_target_tokens_per_s": rounds,
            "target_tokens_per_s": best(rounds),
            "rounds": our_rounds,
        }
        if not measured:
            ours["reason"] = our_rounds[-1]["error"]
    ratios, goal = compare(ours, references, args.dtype)
    anchor_extras = {
        key: value
        for report in anchor_rounds[:1]
        for key, value in report.items()
        if key in ("train_flops_per_step", "ceiling_tflops")
    }
    if any(ratio["ratio"] is not None for ratio in ratios.values()):
        # Same shapes as the anchor: its FLOP count per step holds for ours too.
        step_s = args.batch * args.length / ours["target_tokens_per_s"]
        ours["tflops"] = anchor_extras.get("train_flops_per_step", 0) / step_s / 1e12
        if anchor_extras.get("ceiling_tflops"):
            ours["mfu_vs_measured_matmul"] = ours["tflops"] / anchor_extras["ceiling_tflops"]
    report = {
        "benchmark": "gpu_training",
        "command": "python benchmarks/gpu_training.py " + " ".join(argv),
        "unit": "target tokens/s (best round)",
        "settings": {
            "preset": args.preset,
            "overrides": args.overrides,
            "batch": args.batch,
            "length": args.length,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "impls": args.impls,
            "anchor": str(args.anchor),
            "reference_shape": "tiny" if tiny_reference else "full",
        },
        "machine": {
            "platform": platform.platform(),
            "python": sys.executable,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "ours": ours,
        "references": references,
        "ratios": ratios,
        "goal": goal,
        "anchor": anchor_extras,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0 if ours is None or ours["status"] == "measured" else 1


def print_table(report):
    def shape(entry):
        s = entry.get("shape")
        if not s:
            return ""
        return f"V{s['V']} D{s['D']} H{s['H']} FF{s['FF']} N{s['N']}, {s['B']} x {s['L']}"

    def number(value):
        return "" if value is None else f"{value:,.0f}"

    print("\n| implementation | shape | target tokens/s per round | best | ours / it |")
    print("|---|---|---|---:|---:|")
    entries = ([(OURS, report["ours"])] if report["ours"] else []) + list(
        report["references"].items()
    )
    for name, entry in entries:
        if entry["status"] != "measured":
            print(f"| {name} | {entry['status']}: {entry['reason'][:120]} | | | |")
            continue
        rounds = " / ".join(number(v) for v in entry["rounds_target_tokens_per_s"])
        ratio = report["ratios"].get(name, {})
        # The JSON holds the whole reason; the table its first words ("shapes differ").
        reason = ratio.get("reason", "").split(":")[0]
        ratio_text = f"{ratio['ratio']:.2f}x" if ratio.get("ratio") else reason
        print(
            f"| {name} | {shape(entry)} | {rounds} | {number(entry['target_tokens_per_s'])} | "
            f"{ratio_text} |"
        )
    goal = report["goal"]
    verdict = (
        f"{goal['ratio']:.2f}x ({'met' if goal['met'] else 'not met'})"
        if goal["ratio"] is not None
        else f"no ratio: {goal['reason']}"
    )
    print(f"\ngoal >= {goal['min_ratio']}x {goal['reference']}: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
