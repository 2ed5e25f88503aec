"""Do two SavedModels translate a corpus identically? (A speed change must not change outputs.)

Runs the `serving_default` signature (the configured decoding, beam 4 for the recipes) of
both exports on every source sentence of a corpus, in batches, and counts the sentences whose
translations differ. Used to check that a faster decoding graph, exported from the same
weights, gives today's outputs:

    .venv/bin/python benchmarks/export_equivalence.py OLD_EXPORT NEW_EXPORT \
        --source ../shared/data/multi30k/test_2016_flickr.en \
        --output benchmarks/results/export_equivalence.json

Exits non-zero when any translation differs, and lists the first differences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402


def translate_all(export_dir, sentences, batch_size):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401 - registers the SentencePiece ops of the graph

    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    outputs, begin = [], time.perf_counter()
    for start in range(0, len(sentences), batch_size):
        batch = tf.constant(sentences[start : start + batch_size])
        result = signature(text=batch)
        outputs.extend(t.decode("utf-8") for t in result["translations"].numpy())
    return outputs, time.perf_counter() - begin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--source", type=Path, required=True, help="one sentence per line")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow()
    sentences = args.source.read_text(encoding="utf-8").splitlines()
    old, old_seconds = translate_all(args.old, sentences, args.batch_size)
    new, new_seconds = translate_all(args.new, sentences, args.batch_size)
    differ = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    report = {
        "benchmark": "export_equivalence",
        "command": "python benchmarks/export_equivalence.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "old": str(args.old),
        "new": str(args.new),
        "source": str(args.source),
        "sentences": len(sentences),
        "different": len(differ),
        "first_differences": [{"line": i + 1, "old": old[i], "new": new[i]} for i in differ[:10]],
        "seconds": {"old": old_seconds, "new": new_seconds},
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
