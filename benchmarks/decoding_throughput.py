"""Decoding throughput of greedy and beam search inside `tf.function`, against an uncached loop.

Measures sentences/s and output tokens/s of the graphs a SavedModel would run: each decoder is a
`tf.function` with a `[None, None]` int32 signature (dynamic batch and source length), traced
once and warmed up before timing. The outputs have a fixed length (`ignore_eos=True`), so every
engine and every decoder produces the same number of tokens. Random weights are fine for
throughput: with a forced length the work does not depend on them.

    .venv/bin/python benchmarks/decoding_throughput.py

writes `benchmarks/results/decoding_throughput.json` and prints a markdown table. With
`--saved-model DIR` it also times the export's `greedy_ids`/`beam_ids` signatures (the graph TF
Serving runs, without tokenization); export it with `--fixed-output-length 32` first:

    .venv/bin/python -m serving.export --model-dir runs/multi30k_en_de_small \
        --output exports/bench/transformer/1 --fixed-output-length 32

The TensorFlow runtime's settings are recorded: `TF_ENABLE_ONEDNN_OPTS=1` switches on oneDNN
kernels (off by default on CPUs without AVX-512, such as this machine's), which changes the
speed of the same graph.
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
from keras_transformer.translation.translator import IDS_SPEC, Translator  # noqa: E402

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


def exported_decoders(export_dir, output_length):
    """The exported SavedModel's token-id signatures: name -> callable(source_ids) -> target_ids.

    The export must have been made with `python -m serving.export ... --fixed-output-length N`
    (N = `output_length`) so that it emits as many tokens as the in-process rows; its
    `export.json` is checked for that. The id signatures skip tokenization, so these rows time
    the same decoding work as the Keras rows, through the graph TF Serving would run.
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
        "greedy": lambda ids: greedy(source_ids=ids)["target_ids"],
        f"beam{record['decode_settings']['beam_size']}": lambda ids: beam(source_ids=ids)[
            "target_ids"
        ],
    }


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
        "| decoder | batch | sentences/s | tokens/s | ms/batch |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['decoder']} | {row['batch_size']} | {row['sentences_per_second']:.1f} "
            f"| {row['tokens_per_second']:.0f} | {1000 * row['seconds_per_batch']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--source-length", type=int, default=24)
    parser.add_argument("--output-length", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--decoders", nargs="*", help="subset of decoder names to run")
    parser.add_argument("--saved-model", help="also measure this export (see exported_decoders)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    config = TransformerConfig.preset(args.preset)
    model = build_transformer(config)
    decoders = keras_decoders(model, args.output_length, args.beam_size)
    if args.saved_model:
        exported = exported_decoders(args.saved_model, args.output_length)
        decoders.update({f"savedmodel_{name}": fn for name, fn in exported.items()})
    if args.decoders:
        decoders = {name: fn for name, fn in decoders.items() if name in args.decoders}

    load_before = os.getloadavg()
    rows = []
    for name, decode in decoders.items():
        for batch_size in args.batch_sizes:
            sources = source_batch(config, batch_size, args.source_length)
            row = {"decoder": name, "batch_size": batch_size}
            row.update(measure(decode, sources, args.output_length, args.repeats, args.min_seconds))
            print(
                f"{name} batch {batch_size}: {row['tokens_per_second']:.0f} tokens/s",
                flush=True,
            )
            rows.append(row)

    report = {
        "benchmark": "decoding_throughput",
        "preset": args.preset,
        "config": config.to_dict(),
        "weights": "random (seed 0) for the in-process rows; the export's for savedmodel_*",
        "source_length": args.source_length,
        "output_length": args.output_length,
        "beam_size": args.beam_size,
        "length_penalty_alpha": 0.6,
        "graph": "tf.function, input_signature [None, None] int32, no XLA",
        "timing": f"median of >= {args.repeats} runs and >= {args.min_seconds} s after warmup",
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
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(rows))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
