"""Throughput of the training input pipeline (tokenize + bucket + pad) on Multi30k train.

``python benchmarks/pipeline_throughput.py --output benchmarks/results/pipeline_throughput.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # Run from a checkout: `training` is not installed.

from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402

quiet_tensorflow()

import tensorflow as tf  # noqa: E402

from keras_transformer.translation.tokenizer import SubwordTokenizer  # noqa: E402
from training.corpus import load_corpus  # noqa: E402
from training.pipeline import make_dataset, padding_efficiency  # noqa: E402
from training.vocab import train_vocab  # noqa: E402


def default_data_dir() -> Path:
    return Path(os.environ.get("KT_DATA_DIR", REPO_ROOT / ".." / "shared" / "data")).resolve()


def measure(dataset: tf.data.Dataset, pairs_to_read: int, warmup_pairs: int) -> dict:
    """Times a fresh iterator over ``pairs_to_read`` pairs, after a warmup run of its own.

    The warmup iterator traces the functions, loads the SentencePiece model and completes
    the cache (when there is one). The timed iterator starts cold, so the time includes
    filling the first pool: pools built ahead during a warmup would flatter the number.
    """
    iterator = iter(dataset)
    warmed = 0
    while warmed < warmup_pairs:
        warmed += next(iterator)[1].shape[0]
    del iterator
    iterator = iter(dataset)
    pairs = batches = source_tokens = target_tokens = padded = 0
    start = time.perf_counter()
    while pairs < pairs_to_read:
        features, labels = next(iterator)
        source = features["source_ids"].numpy()
        target = labels.numpy()
        pairs += source.shape[0]
        batches += 1
        source_tokens += int(np.count_nonzero(source))
        target_tokens += int(np.count_nonzero(target))
        padded += source.size + target.size
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 3),
        "pairs": pairs,
        "batches": batches,
        "pairs_per_second": round(pairs / seconds),
        "tokens_per_second": round((source_tokens + target_tokens) / seconds),
        "padded_tokens_per_second": round(padded / seconds),
    }


def tokenize_only(corpus, tokenizer: SubwordTokenizer, sentences_per_call: int, pairs: int) -> dict:
    """Tokenization alone (both sides, parallel map), with ``sentences_per_call`` per op call."""

    def count(sources, targets):
        ids = [tokenizer.tokenize(sources), tokenizer.tokenize(targets)]
        return tf.add_n(
            [tf.size(i.flat_values if isinstance(i, tf.RaggedTensor) else i) for i in ids]
        )

    dataset = corpus.to_dataset().take(pairs)
    if sentences_per_call > 1:
        dataset = dataset.batch(sentences_per_call)
    dataset = dataset.map(count, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    for _ in dataset:  # Warmup pass: same pipeline, so the timed pass starts warm.
        pass
    start = time.perf_counter()
    tokens = sum(int(batch.sum()) for batch in dataset.as_numpy_iterator())
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 3),
        "pairs": pairs,
        "pairs_per_second": round(pairs / seconds),
        "tokens_per_second": round(tokens / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--vocab", help="a SentencePiece .model; trained (8k unigram) if absent")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=5.0, help="epochs measured after warmup")
    parser.add_argument(
        "--warmup-epochs", type=float, default=1.2, help="read before timing (>1 fills the cache)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    load_at_start = round(os.getloadavg()[0], 2)  # The machine is shared; numbers move with load.

    corpus = load_corpus(f"text:{args.data_dir / 'multi30k' / 'train'}", "en", "de")
    with tempfile.TemporaryDirectory() as tmp:
        vocab_seconds = None
        model_path = args.vocab
        if model_path is None:
            summary = train_vocab(corpus, Path(tmp) / "spm", args.vocab_size, "unigram", seed=1)
            model_path, vocab_seconds = summary["model"], summary["seconds"]
        tokenizer = SubwordTokenizer(model_path)

        def dataset(**overrides):
            options = dict(
                batch_tokens=args.batch_tokens,
                max_length=args.max_length,
                repeat=True,
                seed=args.seed,
            )
            options.update(overrides)
            return make_dataset(corpus, tokenizer, **options)

        pairs_to_read = int(args.epochs * len(corpus))
        warmup_pairs = int(args.warmup_epochs * len(corpus))
        runs = {
            "tokenize every epoch": measure(dataset(), pairs_to_read, warmup_pairs),
            "cached ids": measure(dataset(cache=True), pairs_to_read, warmup_pairs),
        }
        # What batching the tokenizer calls buys (the main lever of the pipeline's speed).
        tokenization = {
            "1024 sentences per call": tokenize_only(corpus, tokenizer, 1024, len(corpus)),
            "1 sentence per call": tokenize_only(corpus, tokenizer, 1, len(corpus) // 4),
        }
        efficiency = padding_efficiency(dataset(repeat=False, cache=False), num_batches=None)

    results = {
        "benchmark": "pipeline_throughput",
        "corpus": corpus.report(),
        "vocab": {
            "size": tokenizer.vocab_size,
            "model_type": "unigram",
            "train_seconds": vocab_seconds,
        },
        "batch_tokens": args.batch_tokens,
        "max_length": args.max_length,
        "epochs_measured": args.epochs,
        "warmup_epochs": args.warmup_epochs,
        "runs": runs,
        "tokenization_only": tokenization,
        "padding_efficiency": efficiency,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min_at_start": load_at_start,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "tensorflow": tf.__version__,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print("| run | pairs/s | tokens/s (real) | padded tokens/s |")
    print("|---|---:|---:|---:|")
    for name, run in runs.items():
        print(
            f"| {name} | {run['pairs_per_second']:,} | {run['tokens_per_second']:,} | "
            f"{run['padded_tokens_per_second']:,} |"
        )
    for name, run in tokenization.items():
        print(
            f"| tokenization only, {name} | {run['pairs_per_second']:,} | "
            f"{run['tokens_per_second']:,} | |"
        )
    load = results["machine"]["load_average_1min"]
    print(
        f"\npadding efficiency: source {efficiency['source']:.3f}, target "
        f"{efficiency['target']:.3f}; {efficiency['batches']} batches, mean "
        f"{efficiency['mean_batch_size']:.0f} pairs; 1-min load average {load}"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
