"""Decoding throughput of the exported SavedModel against CTranslate2, interleaved in one run.

Every decoder produces exactly `--output-length` tokens per sentence from `--source-length`
source tokens (24 -> 32, as `../shared/perf/cpu_decode_anchor.py`), greedy and beam 4, batch 1
and 32. Rounds alternate the reference, CTranslate2 fp32 (the anchor's `ct2` worker in its own
process, on the exports' own shape, read from their `transformer_config.json`: vocabulary,
width, heads, feed-forward, layers), and ours (its own process), with the same thread count;
each number is the median time of a decode call after warm-up, encoder included. The ratio
of a round is ours / the CTranslate2 run just before it; the summary is the median of ours
over the median of CTranslate2.

Ours is the export's `greedy_ids`/`beam_ids` signatures (the graphs TF Serving runs, without
tokenization), loaded with `tf.saved_model.load`; export with a fixed output length first:

    .venv/bin/python -m serving.export --model-dir runs/multi30k_en_de_small \
        --output exports/bench/transformer/1 --fixed-output-length 32
    .venv/bin/python benchmarks/decoding_throughput.py --saved-model exports/bench/transformer/1 \
        --ct2-python /tmp/ct2env/bin/python

A `--precision bfloat16` export of the same run (`serving.export ... --precision bfloat16`)
given as a second `--saved-model` adds its rows as `savedmodel_bfloat16_*`, and a
`--jit-compile` export (searches compiled by XLA) its rows as `savedmodel_xla_*`, against the
same CTranslate2 fp32 runs. (CTranslate2: `python3 -m venv /tmp/ct2env &&
/tmp/ct2env/bin/pip install "ctranslate2>=4.8,<4.9" numpy`.) `--in-process` adds the
`Translator`'s decoders on random weights and the uncached loop. The JSON also holds the ops
one decoding step runs in each exported signature (`serving.graph_ops.decoding_step_ops`): op
by op, at batch 1 a step's cost is mostly dispatching them; compiled by XLA
(`"xla_compiled": true`) they are fused into one computation. Writes
`benchmarks/results/decoding_throughput.json` and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402

quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_transformer import TransformerConfig, build_transformer  # noqa: E402
from keras_transformer.decoding import uncached_greedy_search  # noqa: E402
from keras_transformer.decoding.settings import DecodeSettings  # noqa: E402
from keras_transformer.translation.model_dir import TRANSFORMER_CONFIG  # noqa: E402
from keras_transformer.translation.translator import (  # noqa: E402
    DEFAULT_CONCURRENT_SEARCHES,
    IDS_SPEC,
    Translator,
)

RESULTS = Path(__file__).resolve().parent / "results" / "decoding_throughput.json"


def keras_decoders(model, output_length, beam_size=4):
    """The in-process decoders, name -> `callable(source_ids) -> target_ids`.

    Greedy and beam search are the `Translator`'s `greedy_ids`/`beam_ids` signatures (the
    graphs the export saves, without tokenization); the uncached loop is the reference.
    """
    translator = Translator(
        model, None, DecodeSettings(beam_size=beam_size), fixed_output_length=output_length
    )
    uncached = tf.function(
        lambda source_ids: uncached_greedy_search(
            model, source_ids, max_output_length=output_length, ignore_eos=True
        )["target_ids"],
        input_signature=[IDS_SPEC],
    )
    return {
        "greedy": lambda ids: translator.greedy_ids(ids)["target_ids"],
        f"beam{beam_size}": lambda ids: translator.beam_ids(ids)["target_ids"],
        "greedy_uncached": uncached,
    }


def exported_decoders(export_dir, output_length, prefix):
    """The exported SavedModel's token-id signatures: name -> callable(source_ids) -> target_ids.

    The export must have been made with `python -m serving.export ... --fixed-output-length N`
    (N = `output_length`) so that it emits as many tokens as the in-process rows; its
    `export.json` is checked for that. The id signatures skip tokenization, so these rows time
    the same decoding work as the Keras rows, through the graph TF Serving would run. Their
    names start with `prefix` (`export_labels`).
    """
    import tensorflow_text  # noqa: F401 - registers the SentencePiece ops of the graph

    export_dir = Path(export_dir)
    record = json.loads((export_dir / "assets.extra" / "export.json").read_text())
    if record.get("fixed_output_length") != output_length:
        raise SystemExit(
            f"{export_dir} was exported with fixed_output_length="
            f"{record.get('fixed_output_length')}, the benchmark needs {output_length}: "
            f"re-export with --fixed-output-length {output_length}"
        )
    loaded = tf.saved_model.load(str(export_dir))
    greedy, beam = loaded.signatures["greedy_ids"], loaded.signatures["beam_ids"]
    return {
        f"{prefix}_greedy": lambda ids: greedy(source_ids=ids)["target_ids"],
        f"{prefix}_beam{record['decode_settings']['beam_size']}": lambda ids: beam(source_ids=ids)[
            "target_ids"
        ],
    }


def export_label(record):
    """`savedmodel` for a float32 export, `savedmodel_bfloat16` for a `--precision bfloat16` one,
    with `_xla` for a `--jit-compile` one, and `_c{n}` when it searches a batch in `n`
    concurrent shards other than the default (from its `export.json`; exports made before it
    recorded `compute_dtype` are float32, before `jit_compile` op by op, before
    `concurrent_searches` one search at a time). Exports of different `--concurrent-searches`
    can so be timed in one run."""
    dtype = record.get("compute_dtype", "float32")
    label = "savedmodel" if dtype == "float32" else f"savedmodel_{dtype}"
    if record.get("jit_compile"):
        label += "_xla"
    searches = record.get("concurrent_searches", 1)
    return label if searches == DEFAULT_CONCURRENT_SEARCHES else f"{label}_c{searches}"


def export_labels(export_dirs):
    """`export_label` of each export, in order; an export whose label an earlier one already
    has gets `#2`, `#3`, ... (two exports of the same settings, from two versions of the code
    say, are then both timed in one run rather than the later one replacing the earlier)."""
    labels, seen = [], {}
    for export_dir in export_dirs:
        record = json.loads((Path(export_dir) / "assets.extra" / "export.json").read_text())
        label = export_label(record)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return labels


def source_batch(config, batch_size, source_length, seed=0):
    """Random ids in `[4, vocab)` with eos last: no padding, every sentence `source_length` long."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, config.vocab_size, size=(batch_size, source_length), dtype=np.int32)
    ids[:, -1] = config.eos_id
    return tf.constant(ids)


def measure(decode, source_ids, output_length, repeats, min_seconds):
    """Warms `decode` up, then times it; returns the median of at least `repeats` runs."""
    result = decode(source_ids)
    shape = tuple(result.shape)
    if shape[-1] != output_length:
        raise RuntimeError(f"expected {output_length} output tokens, got shape {shape}")
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        np.asarray(decode(source_ids))
        times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    batch = int(source_ids.shape[0])
    return {
        "seconds_per_batch": seconds,
        "runs": len(times),
        "sentences_per_second": batch / seconds,
        "tokens_per_second": batch * output_length / seconds,
    }


def markdown_table(rows):
    lines = [
        "| decoder | batch | tokens/s | CTranslate2 fp32 | ratio (per round) |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        reference, ratio = row.get("ct2_tokens_per_second"), row.get("ratio")
        rounds = ", ".join(f"{r:.2f}" for r in row.get("ratio_per_round", []))
        lines.append(
            f"| {row['decoder']} | {row['batch_size']} | {row['tokens_per_second']:,.0f} | "
            + (f"{reference:,.0f} | **{ratio:.2f}x** ({rounds}) |" if ratio else "| |")
        )
    return "\n".join(lines)


CT2_ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "perf" / "cpu_decode_anchor.py"


def measure_ours(args):
    """Our decoders in this process: rows of `{"decoder", "batch_size", tokens/s, ...}`."""
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    config = benchmark_config(args.saved_model, args.preset)
    decoders = {}
    if args.in_process:
        model = build_transformer(config)
        decoders.update(keras_decoders(model, args.output_length, args.beam_size))
    exports = args.saved_model or []
    for export_dir, label in zip(exports, export_labels(exports), strict=True):
        decoders.update(exported_decoders(export_dir, args.output_length, label))
    if args.decoders:
        decoders = {name: fn for name, fn in decoders.items() if name in args.decoders}
    rows = []
    for name, decode in decoders.items():
        for batch_size in args.batch_sizes:
            sources = source_batch(config, batch_size, args.source_length)
            row = {"decoder": name, "batch_size": batch_size}
            row.update(measure(decode, sources, args.output_length, args.repeats, args.min_seconds))
            rows.append(row)
    return rows


def export_config(export_dir):
    """The `TransformerConfig` an export was made from (`assets.extra/transformer_config.json`)."""
    path = Path(export_dir) / "assets.extra" / TRANSFORMER_CONFIG
    if not path.exists():
        raise SystemExit(f"{export_dir} has no {path.name}: is it a serving.export output?")
    return TransformerConfig.from_dict(json.loads(path.read_text()))


def anchor_shape(config):
    """A config's shape in the CTranslate2 anchor's terms (`../shared/perf/anchor_common.py`)."""
    return {
        "V": config.vocab_size,
        "D": config.d_model,
        "H": config.num_heads,
        "FF": config.ffn_dim,
        "NE": config.num_encoder_layers,
        "ND": config.num_decoder_layers,
    }


def benchmark_config(saved_models, preset):
    """The model every row of a run shares: the exports' own (they must agree, and `--preset`,
    when given, must name the same shape), else `--preset`'s (default `small`). CTranslate2
    then runs that shape: a d 128 export is compared with a d 128 reference, not the preset's."""
    if not saved_models:
        return TransformerConfig.preset(preset or "small")
    configs = {str(path): export_config(path) for path in saved_models}
    shapes = {path: anchor_shape(config) for path, config in configs.items()}
    first = next(iter(shapes.values()))
    if any(shape != first for shape in shapes.values()):
        raise SystemExit(f"the exports differ in shape, time them in separate runs: {shapes}")
    wanted = anchor_shape(TransformerConfig.preset(preset)) if preset else first
    if wanted != first:
        raise SystemExit(
            f"--preset {preset} is {wanted}, the exports are {first}: leave --preset out to "
            "time the exports' shape"
        )
    return next(iter(configs.values()))


# Runs in the CTranslate2 interpreter: the anchor's own worker, on the shape given as JSON in
# argv[1] (the anchor's command line only knows its named shapes), its arguments in argv[2:].
CT2_WORKER = """
import json, sys
sys.path.insert(0, {anchor_dir!r})
import cpu_decode_anchor as anchor
shape = json.loads(sys.argv[1])
args = anchor.parse_args(sys.argv[2:])
args.shape = "_".join(f"{{key}}{{value}}" for key, value in shape.items())
print("RESULT " + json.dumps(anchor.worker_ct2(shape, args)), flush=True)
"""


def run_ct2(args, shape):
    """One CTranslate2 fp32 run of the anchor's worker on `shape` (random weights):
    `{"greedy_b1": tokens/s, "beam4_b32": ...}`."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        command = [
            args.ct2_python, "-c", CT2_WORKER.format(anchor_dir=str(CT2_ANCHOR.parent)),
            json.dumps(shape), "--ct2-compute-types", "float32",
            "--batches", ",".join(map(str, args.batch_sizes)),
            "--beams", f"1,{args.beam_size}", "--src-len", str(args.source_length),
            "--tgt-len", str(args.output_length), "--threads", str(args.threads),
            "--workdir", scratch,
        ]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=False)
    results = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if output.returncode or not results:
        raise RuntimeError(f"CTranslate2 failed on {shape}:\n{output.stderr[-3000:]}")
    ct2 = json.loads(results[-1].removeprefix("RESULT "))
    # The anchor names runs `float32_greedy_b1`, `float32_beam4_b32`.
    return {key.removeprefix("float32_"): run["tokens_per_s"] for key, run in ct2["runs"].items()}


def run_ours(args):
    import subprocess

    command = [sys.executable, __file__, "--worker", *args.forward]
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    if output.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def _reference_key(decoder, batch_size, beam_size):
    """The CTranslate2 run a row of ours compares with, e.g. `beam4_b32`; None for none."""
    kind = decoder.rsplit("_", 1)[-1]
    if kind == "greedy":
        return f"greedy_b{batch_size}"
    if kind == f"beam{beam_size}":
        return f"beam{beam_size}_b{batch_size}"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", help="the in-process model's shape without --saved-model (default small)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--source-length", type=int, default=24)
    parser.add_argument("--output-length", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decoders", nargs="*", help="subset of decoder names to run")
    parser.add_argument(
        "--saved-model",
        nargs="+",
        help="exports to time (see exported_decoders), e.g. a float32 and a bfloat16 one",
    )
    parser.add_argument("--in-process", action="store_true", help="also the in-process decoders")
    parser.add_argument("--rounds", type=int, default=2, help="CTranslate2/ours pairs")
    parser.add_argument("--ct2-python", help="an interpreter with ctranslate2; none: no reference")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_ours(args)))
        return
    if not (args.saved_model or args.in_process):
        parser.error("nothing to time: give --saved-model DIR and/or --in-process")
    # The worker gets this invocation's arguments, minus what only the orchestrator uses.
    args.forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--in-process"]
    if args.in_process:
        args.forward.append("--in-process")

    shape = anchor_shape(benchmark_config(args.saved_model, args.preset))
    load_before = os.getloadavg()
    rounds = []
    for index in range(args.rounds):
        entry = {"ct2_float32": run_ct2(args, shape) if args.ct2_python else None}
        entry["ours"] = run_ours(args)
        for row in entry["ours"]:
            key = _reference_key(row["decoder"], row["batch_size"], args.beam_size)
            reference = (entry["ct2_float32"] or {}).get(key)
            row["ct2_tokens_per_second"] = reference
            row["ratio"] = row["tokens_per_second"] / reference if reference else None
            print(
                f"round {index}: {row['decoder']} batch {row['batch_size']}: "
                f"{row['tokens_per_second']:.0f} tokens/s, CTranslate2 {reference}",
                flush=True,
            )
        rounds.append(entry)

    summary = []
    for position, first in enumerate(rounds[0]["ours"]):
        ours = [r["ours"][position]["tokens_per_second"] for r in rounds]
        references = [r["ours"][position]["ct2_tokens_per_second"] for r in rounds]
        row = {"decoder": first["decoder"], "batch_size": first["batch_size"]}
        row["tokens_per_second"] = statistics.median(ours)
        row["sentences_per_second"] = row["tokens_per_second"] / args.output_length
        row["seconds_per_batch"] = first["batch_size"] / row["sentences_per_second"]
        if all(references):
            row["ct2_tokens_per_second"] = statistics.median(references)
            row["ratio"] = row["tokens_per_second"] / row["ct2_tokens_per_second"]
            row["ratio_per_round"] = [o / r for o, r in zip(ours, references, strict=True)]
        summary.append(row)

    step_ops = {}
    from serving.graph_ops import decoding_step_ops

    exports = args.saved_model or []
    for export_dir, label in zip(exports, export_labels(exports), strict=True):
        for signature in ("greedy_ids", "beam_ids"):
            counted = decoding_step_ops(export_dir, signature)
            # A float32 export's counts keep the plain signature names (as recorded before).
            step_ops[signature if label == "savedmodel" else f"{label}:{signature}"] = counted

    report = {
        "benchmark": "decoding_throughput",
        "command": "python benchmarks/decoding_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": args.preset,
        "shape": shape,
        "saved_model": args.saved_model,
        "source_length": args.source_length,
        "output_length": args.output_length,
        "beam_size": args.beam_size,
        "threads": args.threads,
        "reference": "CTranslate2 float32 (the worker of ../shared/perf/cpu_decode_anchor.py, "
        "on `shape`), random weights of the same shape, forced output length",
        "graph": "tf.function, input_signature [None, None] int32; `_xla` rows: the search "
        "compiled by XLA (export --jit-compile), others op by op",
        "timing": f"median of >= {args.repeats} calls and >= {args.min_seconds} s after warmup",
        "decoding_step_ops": step_ops,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (default)"),
            # Other processes on the machine skew timings; the load average says how much.
            "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        },
        "rounds": rounds,
        "results": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(summary))
    for signature, counted in step_ops.items():
        print(f"{signature}: {counted['ops']} ops per decoding step ({counted['nodes']} nodes)")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
