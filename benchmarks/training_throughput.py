"""Training throughput against the plain Keras 3 reference, interleaved in one invocation.

For each preset the reference (`../shared/perf/cpu_train_anchor.py --impls keras-tf`: a plain
Keras 3 Transformer, fp32) and our model alternate, reference/ours/reference/ours, on the same
batch shape (small 64x24, base 32x32 tokens per side), with the same thread count and the same
timing: the median of `train_on_batch` steps after untimed warm-up steps, each run in its own
process. Ours is compiled by `training.train.compile_model`, exactly as a training run
(label-smoothed loss, the paper's Adam schedule, accuracy and token-count metrics), in each
precision mode of `--modes`. The ratio of a round is ours / the reference run just before it;
the summary ratio is the median of ours over the median of the reference.

`--same-process` adds a second measurement that takes the machine's drift out of the ratio:
the reference model (built by the anchor's own `ref_keras_model.build` and compiled as its
`keras-tf` worker compiles it, on the anchor's `random_batch`) and ours in every mode live in
one process and take turns, `--chunk` steps each, until each has the preset's timed steps.
Between separate processes the ratio moved by a tenth within an hour here; in turns, drift
hits both alike.

`--pipeline` adds our model on the real pipeline: the recipe's token-budget batches of Multi30k
(bucketed, padded, varying shapes), run with `model.fit` as training does, reported as real
(non-padding) target tokens/s over the steps (from `fit`'s start to the end of its last step;
`fit`'s later return is recorded apart); the reference has no counterpart (it takes one fixed
tensor).

    .venv/bin/python benchmarks/training_throughput.py --presets small,base --pipeline

writes `benchmarks/results/training_throughput.json` and prints a markdown table. The machine
is recorded (CPU flags that decide bf16 and oneDNN, whether TensorFlow runs oneDNN kernels):
ratios mean something only between runs in the same invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training_throughput.json"
ANCHOR = ROOT.parent / "shared" / "perf" / "cpu_train_anchor.py"
RECIPE = ROOT / "training" / "configs" / "multi30k_en_de_small.yaml"
# The reference's shapes (cpu_train_anchor.BATCH): sentences x tokens per side.
SHAPES = {"small": (64, 24), "base": (32, 32), "tiny": (8, 16)}
sys.path.insert(0, str(ROOT))

from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402


def _threads(threads):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)


def _compiled_model(preset, mode, **config_overrides):
    """Our model, compiled as `training.train` compiles it, under precision `mode`."""
    import keras

    from keras_transformer import TransformerConfig, build_transformer
    from training.run_config import TrainConfig
    from training.train import compile_model

    keras.utils.set_random_seed(0)
    if mode != "float32":
        keras.mixed_precision.set_global_policy(mode)
    config = TransformerConfig.preset(preset, **config_overrides)
    model = build_transformer(config)
    compile_model(model, config, TrainConfig(mixed_precision=None if mode == "float32" else mode))
    return model, config


def step_seconds(model, inputs, labels):
    """Seconds of one `train_on_batch` step, waited for (its loss read back)."""
    begin = time.perf_counter()
    float(model.train_on_batch(inputs, labels, return_dict=True)["loss"])
    return time.perf_counter() - begin


def worker_fixed(preset, mode, steps, warmup, threads):
    """Median step time of `train_on_batch` on one fixed random batch (the reference's harness)."""
    _threads(threads)
    import numpy as np

    model, config = _compiled_model(preset, mode)
    rows, length = SHAPES[preset]
    rng = np.random.default_rng(0)
    source = rng.integers(4, config.vocab_size, (rows, length)).astype("int32")
    target = rng.integers(4, config.vocab_size, (rows, length + 1)).astype("int32")
    inputs = {"source_ids": source, "target_ids": target[:, :-1]}
    labels = target[:, 1:]
    for _ in range(warmup):
        model.train_on_batch(inputs, labels)
    times = [step_seconds(model, inputs, labels) for _ in range(steps)]
    median = statistics.median(times)
    return {
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "timed_steps": steps,
        "tgt_tokens_per_s": rows * length / median,
        "parameters": model.count_params(),
    }


def worker_same_process(preset, modes, steps, warmup, chunk, threads):
    """The reference and ours in every mode in this process, `chunk` steps each in turn."""
    _threads(threads)
    import keras

    sys.path.insert(0, str(ANCHOR.parent))
    import ref_keras_model
    from anchor_common import SHAPES as ANCHOR_SHAPES
    from cpu_train_anchor import random_batch

    rows, length = SHAPES[preset]
    shape = dict(ANCHOR_SHAPES[preset], B=rows, L=length)
    source, target = random_batch(shape, 0)
    # As the anchor's `keras-tf` worker (seed 0, float32, no XLA).
    keras.utils.set_random_seed(0)
    reference, _, _ = ref_keras_model.build(
        *(shape[k] for k in ("V", "D", "H", "FF", "NE", "ND")),
        dropout=0.1, src_len=length, tgt_len=length,
    )  # fmt: skip
    reference.compile(
        optimizer=keras.optimizers.Adam(1e-4, beta_1=0.9, beta_2=0.98, epsilon=1e-9),
        loss=ref_keras_model.label_smoothed_sparse_ce(0.1),
        jit_compile=False,
    )
    runs = {"reference": (reference, [source, target[:, :-1]])}
    # The anchor's sizes: those of our `small` and `base` presets; `tiny` differs.
    sizes = {
        "vocab_size": shape["V"],
        "d_model": shape["D"],
        "num_heads": shape["H"],
        "ffn_dim": shape["FF"],
        "num_encoder_layers": shape["NE"],
        "num_decoder_layers": shape["ND"],
    }
    for mode in modes:
        model, _ = _compiled_model(preset, mode, **sizes)
        keras.mixed_precision.set_global_policy("float32")  # the next model builds in its own
        runs[mode] = (model, {"source_ids": source, "target_ids": target[:, :-1]})
    labels = target[:, 1:]
    for model, inputs in runs.values():
        for _ in range(warmup):
            model.train_on_batch(inputs, labels)
    times = {name: [] for name in runs}
    while min(len(t) for t in times.values()) < steps:
        for name, (model, inputs) in runs.items():
            times[name] += [step_seconds(model, inputs, labels) for _ in range(chunk)]
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "chunk": chunk,
        "timed_steps": {name: len(t) for name, t in times.items()},
        "reference_tgt_tokens_per_s": rows * length / medians["reference"],
        "ours": {
            mode: {
                "tgt_tokens_per_s": rows * length / medians[mode],
                "ratio": medians["reference"] / medians[mode],
            }
            for mode in modes
        },
    }


def worker_pipeline(mode, batches, warmup, threads, vocab, length_multiple="recipe"):
    """Real Multi30k token-budget batches of the recipe, through `model.fit` as training runs.

    `length_multiple`: the recipe's `data.length_multiple` (`"recipe"`) or another value
    (`"auto"`, `"null"` or a number), resolved as a run resolves it.

    The first `warmup` batches (one trace per new shape) are untimed; then `batches` batches
    are timed, and real target tokens (labels that are not padding) and padded target
    positions are counted from the batches themselves.
    """
    _threads(threads)
    import keras
    import numpy as np

    from keras_transformer.translation.tokenizer import SubwordTokenizer
    from training.corpus import corpus_from_config
    from training.run_config import load_run_config
    from training.train import (
        _prepare_vocab,
        _spec,
        resolve_length_multiple,
        training_dataset,
    )

    overrides = [] if length_multiple == "recipe" else [f"data.length_multiple={length_multiple}"]
    run_config = load_run_config([RECIPE], overrides)
    data = run_config.data
    # The recipe's paths are relative to the repository root, the workers' directory.
    corpus = corpus_from_config(_spec(data.train), data.source_lang, data.target_lang)
    with tempfile.TemporaryDirectory() as scratch:
        # The run's own vocabulary step: copies `vocab` (as data.vocab) or trains one.
        run_config = dataclasses.replace(
            run_config, data=dataclasses.replace(run_config.data, vocab=vocab)
        )
        vocab_path = _prepare_vocab(run_config, Path(scratch), corpus)
        vocab_size = SubwordTokenizer(vocab_path).vocab_size
        # Built before the tokenizer that reads the batches: Keras' seeding resets
        # TensorFlow's resources, the tokenizer's included. Compiled first because the run's
        # batch padding (`data.length_multiple: auto`) depends on whether the step uses XLA.
        model, _ = _compiled_model(run_config.model.preset, mode, vocab_size=vocab_size)
        resolved = resolve_length_multiple(data.length_multiple, model.jit_compile, 1)
        run_config = dataclasses.replace(
            run_config, data=dataclasses.replace(run_config.data, length_multiple=resolved)
        )
        tokenizer = SubwordTokenizer(vocab_path)
        dataset = training_dataset(run_config, corpus, tokenizer)
        stream = list(dataset.take(warmup + batches).as_numpy_iterator())
    # Train on the untimed batches first (every trace the timed ones need happens there when
    # their shapes repeat; a new shape in the timed part is traced inside the timing, as in a
    # real run's first epoch).
    warm = stream[:warmup]
    timed = stream[warmup:]
    timed_fit(model, _generator(warm), len(warm))
    labels = np.concatenate([y.reshape(-1) for _, y in timed])
    real = int((labels != 0).sum())
    seconds, fit_seconds = timed_fit(model, _generator(timed), len(timed))
    shapes = sorted({tuple(y.shape) for _, y in timed})
    return {
        "batches": len(timed),
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "fit_return_seconds": fit_seconds - seconds,
        "real_target_tokens": real,
        "padded_target_positions": int(labels.size),
        "real_tgt_tokens_per_s": real / seconds,
        "distinct_shapes": len(shapes),
        "batch_tokens": data.batch_tokens,
        "length_multiple": data.length_multiple,
        "length_multiple_resolved": resolved,
        "keras": keras.__version__,
    }


def timed_fit(model, dataset, steps, callbacks=()):
    """One epoch of `steps` steps of `model.fit`: seconds from its start to the end of its
    last step, and to its return.

    The two differ: `fit` sometimes returned seconds after its last step (rounds that read
    20.5 s for 40 batches had spent about 10 s after `on_train_end`, every such `fit` ending
    10.24 or 20.48 s after its start: the wake-ups of tf.data's autotuning thread, whose
    period doubles from 10 ms; none with autotuning off). A run calls `fit` once and pays
    that once, so the real-batch rows count the steps and record the rest apart.
    """
    import keras

    class LastStepClock(keras.callbacks.Callback):
        time = None

        def on_train_batch_end(self, batch, logs=None):
            self.time = time.perf_counter()

    clock = LastStepClock()
    begin = time.perf_counter()
    # shuffle=False: the batches come as a dataset, which Keras does not shuffle (True warns).
    model.fit(
        dataset,
        steps_per_epoch=steps,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[clock, *callbacks],
    )
    return clock.time - begin, time.perf_counter() - begin


def _generator(batches):
    import tensorflow as tf

    signature = (
        {
            "source_ids": tf.TensorSpec([None, None], tf.int32),
            "target_ids": tf.TensorSpec([None, None], tf.int32),
        },
        tf.TensorSpec([None, None], tf.int32),
    )
    return tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=signature)


def run_reference(preset, steps, warmup, threads, python):
    """One run of the plain Keras reference; its result record."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "anchor.json"
        command = [
            python, str(ANCHOR), "--shapes", preset, "--impls", "keras-tf",
            "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
            "--tf-python", python, "--out", str(out),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
        record = json.loads(out.read_text())["shapes"][preset]["impls"]["keras-tf"]
    if "error" in record:
        raise RuntimeError(f"the reference failed on {preset}: {record}")
    return record


def run_ours(args, *worker_args):
    command = [sys.executable, __file__, "--worker", *map(str, worker_args)]
    command += ["--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="")
    output = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    if output.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def machine():
    """What decides the precision modes' speed here: CPU flags and TensorFlow's oneDNN."""
    from training.train import cpu_flags

    flags = cpu_flags()
    probe = subprocess.run(
        [sys.executable, "-c", "from tensorflow.python.util import _pywrap_util_port as p;"
         "import tensorflow as tf; print(tf.__version__, p.IsMklEnabled());"
         "from keras_transformer.kernels import native; print(native.describe())"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    lines = probe.stdout.splitlines() + ["", ""]
    version, onednn = (lines[0].split() + ["?", "?"])[:2]
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))),
        "tensorflow": version,
        "onednn_kernels": onednn == "True",
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (default)"),
        # Our loss, layer norm and dropout: compiled kernels or TensorFlow ops.
        "kernels": lines[1] or "?",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--modes", default="float32", help="float32, mixed_bfloat16, ...")
    parser.add_argument("--rounds", type=int, default=2, help="reference/ours pairs per preset")
    parser.add_argument("--steps", default="small=20,base=10,tiny=5", help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="also the reference and ours taking turns in one process (see above)",
    )
    parser.add_argument("--chunk", type=int, default=4, help="steps per turn (--same-process)")
    parser.add_argument("--pipeline", action="store_true", help="also the real-batch case")
    parser.add_argument("--pipeline-batches", type=int, default=40)
    parser.add_argument("--pipeline-warmup", type=int, default=20)
    parser.add_argument(
        "--pipeline-length-multiples",
        default="recipe",
        help="comma-separated data.length_multiple values for the real-batch case: 'recipe' "
        "(the recipe's own), 'auto', 'null' or a number; alternated in rounds of --rounds",
    )
    parser.add_argument("--vocab", help="the pipeline's SentencePiece model (default: train one)")
    parser.add_argument("--reference-python", default=sys.executable)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    steps = dict(item.split("=") for item in args.steps.split(","))

    if args.worker is not None:
        quiet_tensorflow()
        kind, *rest = args.worker
        if kind == "fixed":
            preset, mode, n, warmup = rest
            result = worker_fixed(preset, mode, int(n), int(warmup), args.threads)
        elif kind == "same_process":
            preset, modes, n, warmup, chunk = rest
            result = worker_same_process(
                preset, modes.split(","), int(n), int(warmup), int(chunk), args.threads
            )
        else:
            mode, n, warmup, vocab, length_multiple = rest
            vocab = None if vocab == "-" else vocab
            result = worker_pipeline(
                mode, int(n), int(warmup), args.threads, vocab, length_multiple
            )
        print(json.dumps(result))
        return 0

    modes = args.modes.split(",")
    report = {
        "benchmark": "training_throughput",
        "command": "python benchmarks/training_throughput.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "harness": "median train_on_batch step after warm-up, same shape and threads as the "
        "reference, reference/ours alternating in this invocation",
        "threads": args.threads,
        "machine": machine(),
        "presets": {},
    }
    for preset in filter(None, args.presets.split(",")):
        n = int(steps[preset])
        rounds = []
        for index in range(args.rounds):
            reference = run_reference(preset, n, args.warmup, args.threads, args.reference_python)
            entry = {"reference": reference["tgt_tokens_per_s"], "ours": {}}
            print(f"{preset} round {index}: reference {entry['reference']:,.0f}", flush=True)
            for mode in modes:
                ours = run_ours(args, "fixed", preset, mode, n, args.warmup)
                entry["ours"][mode] = ours["tgt_tokens_per_s"]
                print(f"{preset} round {index}: ours {mode} {ours['tgt_tokens_per_s']:,.0f}")
            rounds.append(entry)
        reference = statistics.median(r["reference"] for r in rounds)
        summary = {}
        for mode in modes:
            ours = statistics.median(r["ours"][mode] for r in rounds)
            summary[mode] = {
                "tgt_tokens_per_s": ours,
                "ratio": ours / reference,
                "ratio_per_round": [r["ours"][mode] / r["reference"] for r in rounds],
            }
        report["presets"][preset] = {
            "batch": "{} x {}".format(*SHAPES[preset]),
            "timed_steps": n,
            "rounds": rounds,
            "reference_tgt_tokens_per_s": reference,
            "ours": summary,
        }
        if args.same_process:
            turns = run_ours(
                args, "same_process", preset, ",".join(modes), n, args.warmup, args.chunk
            )
            report["presets"][preset]["same_process"] = turns
            for mode, ours in turns["ours"].items():
                print(f"{preset} same process: {mode} {ours['ratio']:.2f}x the reference")
    if args.pipeline:
        # Each case runs once per round, the cases alternating (drift hits them alike).
        report["pipeline"] = {}
        vocab = args.vocab or "-"
        for index in range(args.rounds):
            for mode in modes:
                for multiple in args.pipeline_length_multiples.split(","):
                    result = run_ours(
                        args, "pipeline", mode, args.pipeline_batches, args.pipeline_warmup,
                        vocab, multiple,
                    )  # fmt: skip
                    key = mode if multiple == "recipe" else f"{mode}, length_multiple {multiple}"
                    report["pipeline"].setdefault(key, []).append(result)
                    print(
                        f"pipeline {key} round {index}: "
                        f"{result['real_tgt_tokens_per_s']:,.0f} real tokens/s",
                        flush=True,
                    )
    report["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(report))
    print(f"\nwrote {args.output}")
    return 0


def markdown_table(report):
    lines = [
        "| preset | batch | mode | ours, target tokens/s | plain Keras fp32 | ratio (per round) |",
        "|---|---|---|---:|---:|---|",
    ]
    for preset, entry in report["presets"].items():
        for mode, ours in entry["ours"].items():
            rounds = ", ".join(f"{r:.2f}" for r in ours["ratio_per_round"])
            lines.append(
                f"| {preset} | {entry['batch']} | {mode} | {ours['tgt_tokens_per_s']:,.0f} | "
                f"{entry['reference_tgt_tokens_per_s']:,.0f} | **{ours['ratio']:.2f}x** "
                f"({rounds}) |"
            )
    for preset, entry in report["presets"].items():
        turns = entry.get("same_process")
        for mode, ours in (turns or {"ours": {}})["ours"].items():
            lines.append(
                f"| {preset}, same process, turns of {turns['chunk']} steps | {entry['batch']} "
                f"| {mode} | {ours['tgt_tokens_per_s']:,.0f} | "
                f"{turns['reference_tgt_tokens_per_s']:,.0f} | **{ours['ratio']:.2f}x** |"
            )
    for case, results in report.get("pipeline", {}).items():
        if isinstance(results, dict):  # one result per case, as recorded before rounds
            results = [results]
        rates = [r["real_tgt_tokens_per_s"] for r in results]
        padded = sum(r["padded_target_positions"] for r in results)
        real = sum(r["real_target_tokens"] for r in results)
        lines.append(
            f"| small, Multi30k batches | {results[0]['batch_tokens']}-token budget, "
            f"{real / padded:.0%} real | {case} | {statistics.median(rates):,.0f} real "
            f"({', '.join(f'{rate:,.0f}' for rate in rates)}) | | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
