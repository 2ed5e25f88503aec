"""Where a training step's time goes on the JAX backend: a `jax.profiler` trace, summarised.

Builds and compiles the model exactly as `benchmarks/gpu_training.py` measures it
(`build_ours`: our model, loss, optimizer and metric, random ids without padding), runs the
warm-up steps (XLA compilation) in one `fit` call, traces `--steps` steps of a second one, and
adds up the device time of every XLA op in the trace:

- by op (the HLO instruction's name without its number: `fusion`, `custom-call`, ...) and
  by instruction, to see whether matrix products (cuBLAS / cuDNN custom calls, Triton GEMM
  fusions) or the memory-bound fusions around them dominate;
- by the JAX source op (the `jit(...)/.../layer/primitive` name that XLA keeps in each
  instruction's metadata: the `tf_op` stat, or else the optimized HLO that XLA dumps), folded
  to the layer path and the primitive, and split into forward, backward (`transpose(jvp(...))`
  marks the backward pass) and the optimizer update.

On a GPU the events are the device's "XLA Ops" line; on a CPU (to check the script with tiny
shapes) they are the thunks on XLA's host threads, which carry `hlo_op` but no source names.
The summary is written as markdown (`--output`) and JSON beside it; `--trace-copy DIR` also
keeps the raw `.xplane.pb` (gzipped) for a closer look with TensorBoard's profile plugin.

    KERAS_BACKEND=jax python benchmarks/profile_gpu_step.py \
        --output benchmarks/results/gpu_training_profile.md           # base, 768 x 32, on a GPU
    KERAS_BACKEND=jax python benchmarks/profile_gpu_step.py --preset tiny --batch 8 --length 8 \
        --steps 2 --output /tmp/profile.md                              # CPU check
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_training import (  # noqa: E402
    add_model_arguments,
    build_ours,
    check_counts,
    shape_of,
    wait_for_updates,
)

TOP = 25
MATMUL_HINTS = ("gemm", "cublas", "cudnn", "cutlass", "matmul", "dot", "wgmma", "xmma", "nvjet")


def trace_steps(args, trace_dir: Path) -> dict:
    """Warms up, then traces `args.steps` steps; returns timing facts of the traced call."""
    import jax
    import keras

    rows = max(args.steps, args.warmup_steps) * args.batch
    model, config, x, y = build_ours(args.preset, args.overrides, args.length, rows, args.dtype)
    fit = dict(batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    model.fit(x, y, steps_per_epoch=args.warmup_steps, **fit)
    wait_for_updates(model)
    with jax.profiler.trace(str(trace_dir)):
        start = time.perf_counter()
        model.fit(x, y, steps_per_epoch=args.steps, **fit)
        wait_for_updates(model)
        seconds = time.perf_counter() - start
    devices = jax.devices()
    return {
        "jax_version": jax.__version__,
        "keras_version": keras.__version__,
        "device_kind": devices[0].device_kind,
        "shape": shape_of(config, args.batch, args.length),
        "dtype": args.dtype,
        "traced_steps": args.steps,
        "traced_wall_s": seconds,
        "step_s_under_profiler": seconds / args.steps,
    }


def stat_dict(event) -> dict:
    return {name: value for name, value in event.stats}


def op_events(xplane_path: Path, source_names: dict) -> tuple[str, list[dict], dict]:
    """(where the events came from, [{"name", "ns", "hlo_op", "tf_op"}], what the trace held).

    `source_names` maps (HLO module, instruction) to the JAX op name from the XLA dump, for
    events whose stats carry no `tf_op`.
    """
    import jax

    data = jax.profiler.ProfileData.from_file(str(xplane_path))
    planes = list(data.planes)
    layout = {}  # plane -> line -> [events, stat names of its first event]
    for plane in planes:
        for line in plane.lines:
            events = list(line.events)
            first = sorted(stat_dict(events[0])) if events else []
            layout.setdefault(plane.name, {})[line.name] = [len(events), first]

    def record(event, stats):
        hlo_op = str(stats.get("hlo_op", event.name))
        module = str(stats.get("hlo_module", ""))
        tf_op = str(stats.get("tf_op", ""))
        if hlo_op.startswith("command_buffer") or not tf_op or tf_op.startswith("XlaModule"):
            # Inside a CUDA graph (XLA's command buffers) every kernel carries the buffer's
            # name; the kernel is named for its instruction, `loop_add_fusion.12` as
            # `loop_add_fusion_12`.
            instruction = re.sub(r"_(\d+)$", r".\1", event.name)
            for candidate in (event.name, instruction):
                if (module, candidate) in source_names:
                    hlo_op, tf_op = candidate, source_names[(module, candidate)]
                    break
            else:
                tf_op = source_names.get((module, hlo_op), "")
        return {"name": event.name, "ns": event.duration_ns, "hlo_op": hlo_op, "tf_op": tf_op}

    devices = [p for p in planes if p.name.startswith("/device:GPU")]
    for line_wanted, source in (("XLA Ops", "device XLA Ops line"), (None, "device streams")):
        events = []
        for plane in devices:
            for line in plane.lines:
                if line_wanted and line.name != line_wanted:
                    continue
                if not line_wanted and line.name in ("XLA Modules", "XLA Ops", "Steps"):
                    continue  # derived lines would count the kernels twice
                for event in line.events:
                    stats = stat_dict(event)
                    if line_wanted or "hlo_op" in stats:
                        events.append(record(event, stats))
        if events:
            return source, events, layout
    events = []
    for plane in planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                stats = stat_dict(event)
                if "hlo_op" in stats:
                    events.append(record(event, stats))
    return "host thunks (no device plane)", events, layout


def dumped_source_names(dump_dir: Path) -> dict:
    """(module, instruction) -> `op_name` metadata, from the optimized HLO text XLA dumped.

    A fusion instruction often carries no metadata of its own (XLA keeps it on the
    instructions it fused); it takes the name of its fused computation's root, or else of the
    last named instruction there (the one nearest the root: the instructions are in
    topological order). Unnamed fusions were more than half of the CPU check's time.
    """
    names = {}
    instruction = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
    op_name = re.compile(r"metadata=\{[^}]*op_name=\"([^\"]*)\"")
    calls = re.compile(r"\bfusion\(.*calls=%?([\w.\-]+)")
    computation = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
    for path in glob.glob(f"{dump_dir}/*after_optimizations.txt"):
        text = Path(path).read_text()
        header = re.search(r"^HloModule\s+([\w.\-]+)", text, re.MULTILINE)
        module = header.group(1) if header else ""
        named_in = {}  # computation -> (root's name, last name seen)
        fusions = {}  # instruction -> fused computation, for fusions without a name
        current = None
        for line in text.splitlines():
            opened = computation.match(line)
            if opened:
                current = opened.group(1)
                continue
            match = instruction.match(line)
            if not match:
                continue
            found = op_name.search(line)
            if found:
                names[(module, match.group(1))] = found.group(1)
                root = named_in.get(current, ("", ""))[0]
                is_root = line.lstrip().startswith("ROOT")
                named_in[current] = (found.group(1) if is_root else root, found.group(1))
            else:
                fused = calls.search(line)
                if fused:
                    fusions[match.group(1)] = fused.group(1)
        for name, fused in fusions.items():
            root, last = named_in.get(fused, ("", ""))
            if root or last:
                names[(module, name)] = root or last
    return names


def op_kind(hlo_op: str) -> str:
    """`fusion.123` -> `fusion`; `custom-call.7` -> `custom-call`."""
    return re.sub(r"[.\d]+$", "", hlo_op) or hlo_op


def source_parts(tf_op: str) -> tuple[str, str, str]:
    """(pass, layer path, primitive) of a JAX op name such as
    `jit(train_step)/transpose(jvp(functional))/decoder_0/self_attention/query/dot_general`."""
    if not tf_op:
        return ("(no source name)", "(no source name)", "(no source name)")
    parts = [p for p in tf_op.split("/") if p]
    primitive = parts[-1] if parts else "?"
    # Drop the wrappers jit(...), jvp(...), transpose(...), while/body etc.: keep layer names.
    layers = [p for p in parts[:-1] if "(" not in p and p not in ("while", "body", "cond")]
    if any("adam" in p.lower() or "optimizer" in p.lower() for p in layers):
        step = "optimizer update"
    else:
        step = "backward" if "transpose(" in tf_op else "forward"
    return (step, "/".join(layers) or "(top)", primitive)


def summarise(events: list[dict], traced_steps: int) -> dict:
    total = sum(e["ns"] for e in events) or 1

    def table(key_of):
        sums = collections.Counter()
        counts = collections.Counter()
        for e in events:
            key = key_of(e)
            sums[key] += e["ns"]
            counts[key] += 1
        return [
            {
                "key": key,
                "ms_per_step": ns / 1e6 / traced_steps,
                "share": ns / total,
                "count_per_step": counts[key] / traced_steps,
            }
            for key, ns in sums.most_common()
        ]

    def category(e):
        text = (e["name"] + " " + e["hlo_op"]).lower()
        if any(h in text for h in MATMUL_HINTS) or "dot_general" in e["tf_op"]:
            return "matrix products (GEMM kernels, dot fusions)"
        if "threefry" in e["tf_op"] or "random" in e["tf_op"]:
            return "random numbers (dropout masks)"
        if op_kind(e["hlo_op"]) in ("copy", "transpose", "bitcast", "copy-start", "copy-done"):
            return "copies and transposes"
        if op_kind(e["hlo_op"]).startswith(("all-", "reduce-scatter", "collective")):
            return "collectives"
        return "other fusions and elementwise"

    return {
        "device_ms_per_step": total / 1e6 / traced_steps,
        "events": len(events),
        "by_category": table(category),
        "by_op": table(lambda e: op_kind(e["hlo_op"])),
        "by_event": table(lambda e: f"{e['name']} <- {' '.join(source_parts(e['tf_op'])[:2])}"),
        "by_pass": table(lambda e: source_parts(e["tf_op"])[0]),
        "by_primitive": table(lambda e: source_parts(e["tf_op"])[2]),
        "by_layer": table(lambda e: " ".join(source_parts(e["tf_op"])[:2])),
    }


def markdown(report: dict) -> str:
    facts = report["run"]
    summary = report["summary"]
    lines = [
        "# Training step profile on the JAX backend",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{facts['device_kind']}, jax {facts['jax_version']}, keras {facts['keras_version']}, "
        f"{facts['dtype']}, shape {facts['shape']}; {facts['traced_steps']} traced steps, "
        f"{facts['step_s_under_profiler'] * 1e3:.1f} ms per step under the profiler; "
        f"{summary['device_ms_per_step']:.1f} ms of XLA ops per step ({report['source']}, "
        f"{summary['events']} events).",
        "",
    ]
    titles = {
        "by_category": "By category",
        "by_pass": "By pass (from the op's source name)",
        "by_op": "By HLO op kind",
        "by_primitive": "By JAX primitive",
        "by_layer": "By pass and layer",
        "by_event": "By XLA op (and the layer it came from)",
    }
    for key, title in titles.items():
        lines += [
            f"## {title}",
            "",
            "| what | ms/step | share | ops/step |",
            "|---|---:|---:|---:|",
        ]
        for row in summary[key][:TOP]:
            lines.append(
                f"| `{row['key']}` | {row['ms_per_step']:.3f} | {row['share']:.1%} | "
                f"{row['count_per_step']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, steps=5, steps_help="traced steps")
    parser.add_argument("--output", type=Path, required=True, help="markdown summary")
    parser.add_argument("--trace-copy", type=Path, help="folder to keep the gzipped xplane in")
    args = parser.parse_args(argv)
    check_counts(parser, args)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as trace_dir, tempfile.TemporaryDirectory() as dump_dir:
        # The optimized HLO of the train step names each instruction's JAX source op; XLA
        # reads its flags when the backend starts, which is after this point.
        os.environ["XLA_FLAGS"] = " ".join(
            [
                os.environ.get("XLA_FLAGS", ""),
                f"--xla_dump_to={dump_dir}",
                "--xla_dump_hlo_as_text",
                "--xla_dump_hlo_module_re=.*train_step.*",
            ]
        ).strip()
        run = trace_steps(args, Path(trace_dir))
        found = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
        if not found:
            raise SystemExit(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
        names = dumped_source_names(Path(dump_dir))
        source, events, layout = op_events(Path(found[-1]), names)
        if not events:
            raise SystemExit(f"no XLA op events in {found[-1]} ({source})")
        if args.trace_copy:
            args.trace_copy.mkdir(parents=True, exist_ok=True)
            with (
                open(found[-1], "rb") as raw,
                gzip.open(args.trace_copy / "train_step.xplane.pb.gz", "wb") as packed,
            ):
                shutil.copyfileobj(raw, packed)
    report = {
        "benchmark": "profile_gpu_step",
        "command": "python benchmarks/profile_gpu_step.py " + " ".join(argv),
        "run": run,
        "source": source,
        "source_names_from_dump": len(names),
        "summary": summarise(events, args.steps),
        "trace_layout": layout,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown(report) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
