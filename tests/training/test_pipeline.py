"""Tests of the tf.data pipeline on real Multi30k: budgets, padding, determinism, distribution."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from keras_transformer.translation.tokenizer import SubwordTokenizer
from training.corpus import ParallelCorpus, load_corpus
from training.pipeline import (
    batch_shapes,
    count_too_long,
    default_bucket_boundaries,
    make_dataset,
    padding_efficiency,
)
from training.vocab import train_vocab

BATCH_TOKENS = 2048
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def corpus(shared_data_dir):
    return load_corpus(f"text:{shared_data_dir}/multi30k/train", "en", "de")


@pytest.fixture(scope="module")
def small_corpus(corpus):
    """The first 5000 pairs, for tests that need real sentences but not a whole epoch."""
    return ParallelCorpus(corpus.sources[:5000], corpus.targets[:5000], "en", "de", "small")


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("vocab") / "spm"
    summary = train_vocab(corpus, prefix, 500, "unigram", sample_size=6000, seed=1)
    return SubwordTokenizer(summary["model"])


def batches(dataset):
    return list(dataset.as_numpy_iterator())


def rows(matrix):
    """The rows of a 0-padded id matrix as tuples without the padding."""
    return [tuple(int(i) for i in row if i != 0) for row in matrix]


@pytest.fixture(scope="module")
def multi30k_epoch(corpus, tokenizer):
    """One epoch over all of Multi30k train: the dataset (ids cached) and its batches."""
    dataset = make_dataset(
        corpus, tokenizer, batch_tokens=BATCH_TOKENS, max_length=MAX_LENGTH, seed=7, cache=True
    )
    return dataset, batches(dataset)


def test_batches_hold_each_pair_once_shifted_and_within_budget(corpus, tokenizer, multi30k_epoch):
    dataset, epoch = multi30k_epoch
    spec = dataset.element_spec
    assert spec[0]["source_ids"] == tf.TensorSpec([None, None], tf.int32)
    assert spec[0]["target_ids"] == tf.TensorSpec([None, None], tf.int32)
    assert spec[1] == tf.TensorSpec([None, None], tf.int32)

    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    pairs = collections.Counter()
    for features, labels in epoch:
        source, target = features["source_ids"], features["target_ids"]
        # The token budget holds on both sides, padding included.
        assert source.size <= BATCH_TOKENS and labels.size <= BATCH_TOKENS
        assert target.shape == labels.shape
        for source_row, target_row, label_row in zip(
            rows(source), rows(target), rows(labels), strict=True
        ):
            assert source_row[-1] == eos and eos not in source_row[:-1]
            assert target_row[0] == bos and label_row[-1] == eos
            assert target_row[1:] == label_row[:-1]  # Teacher forcing: labels shifted by one.
            pairs[(source_row[:-1], label_row[:-1])] += 1
        # Padded to the batch's longest pair, not beyond.
        assert (source[:, -1] != 0).any() and (labels[:, -1] != 0).any()

    assert pairs == expected_pairs(tokenizer, corpus, MAX_LENGTH)


def test_padding_efficiency_on_multi30k(corpus, tokenizer, multi30k_epoch):
    dataset, epoch = multi30k_epoch
    report = padding_efficiency(dataset)  # A second pass, from the cache.
    assert report["source"] > 0.9 and report["target"] > 0.9
    assert report["batches"] == len(epoch)
    assert report["pairs"] == sum(labels.shape[0] for _, labels in epoch)
    assert report["max_source_tokens_in_batch"] <= BATCH_TOKENS
    assert report["max_target_tokens_in_batch"] <= BATCH_TOKENS
    # Batches use most of their budget: only a few per pool are part-filled.
    fill = report["target_tokens"] / (report["batches"] * BATCH_TOKENS)
    assert fill > 0.7


def test_over_long_pairs_are_dropped_and_counted(small_corpus, tokenizer):
    max_length = 16
    counts = count_too_long(small_corpus, tokenizer, max_length)
    assert counts["pairs"] == len(small_corpus)
    assert 0 < counts["too_long"] < len(small_corpus)
    dataset = make_dataset(small_corpus, tokenizer, batch_tokens=512, max_length=max_length, seed=1)
    report = padding_efficiency(dataset)
    assert report["pairs"] == counts["kept"]
    for features, labels in batches(dataset):
        assert features["source_ids"].shape[1] <= max_length and labels.shape[1] <= max_length


def test_custom_bucket_boundaries_bound_batch_sizes(small_corpus, tokenizer):
    dataset = make_dataset(
        small_corpus,
        tokenizer,
        batch_tokens=1024,
        max_length=MAX_LENGTH,
        bucket_boundaries=[16, 32],
        seed=1,
    )
    for features, labels in batches(dataset):
        length = max(features["source_ids"].shape[1], labels.shape[1])
        bound = next(b for b in (16, 32, MAX_LENGTH) if length <= b)
        assert labels.shape[0] <= 1024 // bound


@pytest.mark.parametrize(
    ("devices", "expected_shapes"),
    [
        (1, [(64, 16), (32, 32), (21, 48), (17, 60)]),
        # Data parallel over 4 devices: rows rounded down to a multiple of 4 (Keras splits the
        # global batch by rows); buckets hold fewer pairs per batch and still lose none.
        (4, [(64, 16), (32, 32), (20, 48), (16, 60)]),
    ],
)
def test_length_multiple_gives_fixed_shapes_and_keeps_every_pair(
    small_corpus, tokenizer, devices, expected_shapes
):
    # 60 is not a multiple of 16: the last bucket is capped there. With a multiple of 16 the
    # coarse bucket 8 becomes 16 too; left at 8, its batches (128 rows) would not fit the
    # 64 rows of shape 16 and lose pairs.
    max_length, multiple = 60, 16
    shapes = batch_shapes(max_length, 1024, multiple, rows_multiple=devices)
    assert shapes == expected_shapes
    dataset = make_dataset(
        small_corpus,
        tokenizer,
        batch_tokens=1024,
        max_length=max_length,
        seed=3,
        length_multiple=multiple,
        rows_multiple=devices,
    )
    pairs, seen = collections.Counter(), set()
    for features, labels in batches(dataset):
        source, target = features["source_ids"], features["target_ids"]
        assert source.shape == target.shape == labels.shape
        assert source.shape in shapes and source.shape[0] % devices == 0
        seen.add(source.shape)
        real = (source != 0).any(axis=1)
        # Rows added to fill the shape are padding only, on every side.
        assert not (target[~real] != 0).any() and not (labels[~real] != 0).any()
        for source_row, label_row in zip(rows(source[real]), rows(labels[real]), strict=True):
            pairs[(source_row[:-1], label_row[:-1])] += 1
    assert len(seen) > 1
    assert pairs == expected_pairs(tokenizer, small_corpus, max_length)


def test_same_seed_same_batches_other_seed_other_batches(small_corpus, tokenizer):
    def first_batches(seed, cache=False):
        dataset = make_dataset(
            small_corpus,
            tokenizer,
            batch_tokens=BATCH_TOKENS,
            max_length=MAX_LENGTH,
            seed=seed,
            repeat=True,
            cache=cache,
            pool_size=4096,
        )
        # 100 batches run through more than one epoch and several pools.
        return [labels for _, labels in batches(dataset.take(100))]

    def same(a, b):
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    reference = first_batches(3)
    assert same(reference, first_batches(3, cache=True))  # The cache changes nothing.
    assert not same(reference, first_batches(4))


def test_file_cache_and_dataset_input(small_corpus, tokenizer, tmp_path):
    # A tf.data.Dataset of string pairs works as input too; the cache goes to files.
    small = small_corpus.to_dataset()
    cache = tmp_path / "cache" / "ids"
    cache.parent.mkdir()
    dataset = make_dataset(
        small, tokenizer, batch_tokens=BATCH_TOKENS, max_length=MAX_LENGTH, seed=1, cache=str(cache)
    )
    first = padding_efficiency(dataset)
    assert list(cache.parent.iterdir()), "cache files were not written"
    second = padding_efficiency(dataset)  # Reads from the cache.
    assert first["pairs"] == second["pairs"] == count_too_long(small, tokenizer, MAX_LENGTH)["kept"]


def test_repeat_keeps_going_and_unshuffled_is_ordered_by_length(small_corpus, tokenizer):
    repeated = make_dataset(
        small_corpus,
        tokenizer,
        batch_tokens=BATCH_TOKENS,
        max_length=MAX_LENGTH,
        repeat=True,
        seed=1,
    )
    report = padding_efficiency(repeated, num_batches=120)
    assert report["batches"] == 120 and report["pairs"] > len(small_corpus)

    ordered = make_dataset(
        small_corpus, tokenizer, batch_tokens=BATCH_TOKENS, max_length=MAX_LENGTH, shuffle=False
    )
    widths = [labels.shape[1] for _, labels in batches(ordered.take(10))]
    assert widths[0] <= widths[-1]


def test_distribute_strategy_accepts_the_dataset(small_corpus, tokenizer):
    strategy = tf.distribute.MirroredStrategy()
    dataset = make_dataset(
        small_corpus,
        tokenizer,
        batch_tokens=BATCH_TOKENS,
        max_length=MAX_LENGTH,
        seed=1,
        repeat=True,
    )
    distributed = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def step(features, labels):
        def count(features, labels):
            return tf.math.count_nonzero(labels) + tf.math.count_nonzero(features["source_ids"])

        per_replica = strategy.run(count, args=(features, labels))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    iterator = iter(distributed)
    for _ in range(3):
        assert int(step(*next(iterator))) > 0


def test_argument_errors(corpus, tokenizer):
    with pytest.raises(ValueError, match="batch_tokens=32 cannot hold one pair of max_length=64"):
        make_dataset(corpus, tokenizer, batch_tokens=32, max_length=64)
    with pytest.raises(TypeError, match="got list"):
        make_dataset([("a", "b")], tokenizer, batch_tokens=64, max_length=64)
    with pytest.raises(ValueError, match="fewer than one per device \\(8\\)"):
        make_dataset(
            corpus, tokenizer, batch_tokens=448, max_length=64, length_multiple=8, rows_multiple=8
        )
    with pytest.raises(ValueError, match="rows_multiple=2 .* set length_multiple"):
        make_dataset(corpus, tokenizer, batch_tokens=448, max_length=64, rows_multiple=2)


def test_default_bucket_boundaries():
    bounds = default_bucket_boundaries(256)
    assert bounds[0] == 8 and bounds[-1] == 256
    assert all(b < c for b, c in zip(bounds, bounds[1:], strict=False))
    assert len(bounds) < 45
    assert default_bucket_boundaries(5) == [5]


def expected_pairs(tokenizer, corpus, max_length):
    """Counter of the `(source ids, target ids)` pairs that fit `max_length` with eos/bos."""
    sources = tokenizer.tokenize(tf.constant(corpus.sources)).to_list()
    targets = tokenizer.tokenize(tf.constant(corpus.targets)).to_list()
    return collections.Counter(
        (tuple(s), tuple(t))
        for s, t in zip(sources, targets, strict=True)
        if len(s) + 1 <= max_length and len(t) + 1 <= max_length
    )
