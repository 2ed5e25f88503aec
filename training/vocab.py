"""Trains one SentencePiece vocabulary shared by both languages of a parallel corpus.

``python -m training.vocab --corpus text:../shared/data/multi30k/train --source-lang en
--target-lang de --output runs/vocab/spm --vocab-size 8000`` writes ``spm.model`` and ``spm.vocab``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from keras_transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from quiet_logs import add_verbose_argument
from training.corpus import ParallelCorpus, load_corpus

MODEL_TYPES = ("unigram", "bpe")


def _sample(texts: Sequence[str], sample_size: int, seed: int) -> list[str]:
    if sample_size <= 0 or sample_size >= len(texts):
        return list(texts)
    rng = random.Random(seed)
    # Sorted indices keep corpus order, which makes the sample independent of set iteration.
    return [texts[i] for i in sorted(rng.sample(range(len(texts)), sample_size))]


def train_vocab(
    corpus_or_texts: ParallelCorpus | Iterable[str],
    output_prefix: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    sample_size: int = 1_000_000,
    seed: int = 1,
    *,
    character_coverage: float = 1.0,
    hard_vocab_limit: bool = True,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Trains a SentencePiece model with pad=0, unk=1, bos=2, eos=3.

    Args:
        corpus_or_texts: A ``ParallelCorpus`` (both sides are used) or an iterable of sentences.
        output_prefix: Writes ``{output_prefix}.model`` and ``{output_prefix}.vocab``.
        vocab_size: Number of pieces, including the 4 special ones.
        model_type: ``"unigram"`` or ``"bpe"``.
        sample_size: At most this many sentences, drawn at random with ``seed``, are used.
        seed: Seed of the sentence sample and of SentencePiece's own random generator.
        character_coverage: Fraction of characters covered by the vocabulary (1.0 for
            languages with small alphabets).
        hard_vocab_limit: With False, tiny corpora may yield fewer pieces than ``vocab_size``
            instead of failing.
        num_threads: Trainer threads; all cores when None.

    Returns:
        A summary dict: model and vocab paths, vocab_size, model_type, sentences, seed, seconds.

    Raises:
        ValueError: for an unknown model type or when there is nothing to train on.
    """
    import sentencepiece as spm  # Lazy: only vocabulary training needs the trainer.

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if isinstance(corpus_or_texts, ParallelCorpus):
        texts = list(corpus_or_texts.texts())
    else:
        texts = list(corpus_or_texts)
    sample = [text for text in _sample(texts, sample_size, seed) if text.strip()]
    if not sample:
        raise ValueError(f"No non-empty sentences to train a vocabulary for {output_prefix}")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        # An iterator, not a temporary file: a sentence holding a newline cannot split in two.
        sentence_iterator=iter(sample),
        model_prefix=str(output_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=hard_vocab_limit,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        # The sample is already bounded; let the trainer use all of it.
        input_sentence_size=0,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=f"{output_prefix}.model")
    return {
        "model": f"{output_prefix}.model",
        "vocab": f"{output_prefix}.vocab",
        "vocab_size": processor.get_piece_size(),
        "model_type": model_type,
        "sentences": len(sample),
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: trains a shared vocabulary and prints a one-line JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus spec, e.g. text:data/train")
    parser.add_argument("--source-lang", required=True)
    parser.add_argument("--target-lang", required=True)
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    parser.add_argument("--sample-size", type=int, default=1_000_000)
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-hard-vocab-limit",
        action="store_true",
        help="allow fewer pieces than --vocab-size (tiny corpora)",
    )
    add_verbose_argument(parser)
    args = parser.parse_args(argv)

    corpus = load_corpus(args.corpus, args.source_lang, args.target_lang)
    summary = train_vocab(
        corpus,
        args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        sample_size=args.sample_size,
        seed=args.seed,
        character_coverage=args.character_coverage,
        hard_vocab_limit=not args.no_hard_vocab_limit,
    )
    summary["corpus"] = corpus.report()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
