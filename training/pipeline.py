"""tf.data input pipeline: sentence pairs -> SentencePiece ids -> length buckets of token batches.

Each element is ``({"source_ids": [b, s], "target_ids": [b, t]}, labels [b, t])``, int32, 0-padded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_transformer.translation.tokenizer import SubwordTokenizer
from training.corpus import ParallelCorpus

DEFAULT_SHUFFLE_BUFFER = 100_000
DEFAULT_TOKENIZE_BATCH = 1024
DEFAULT_POOL_SIZE = 32_768

# The map functions below have no tensor-dependent Python control flow, so they skip AutoGraph
# (@do_not_convert): converting them cost about a second per make_dataset call.


def default_bucket_boundaries(max_length: int, min_length: int = 8, step: float = 1.1) -> list[int]:
    """Bucket upper bounds growing by ~10% from ``min_length`` to ``max_length`` (inclusive).

    Narrow buckets keep padding low (each batch is padded to at most its bucket's bound); the
    geometric growth keeps their number small (about 40 for ``max_length=256``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    bounds = []
    bound = min(min_length, max_length)
    while bound < max_length:
        bounds.append(bound)
        bound = max(bound + 1, int(bound * step))
    bounds.append(max_length)
    return bounds


def _to_pair_dataset(corpus_or_dataset: ParallelCorpus | tf.data.Dataset) -> tf.data.Dataset:
    if isinstance(corpus_or_dataset, ParallelCorpus):
        return corpus_or_dataset.to_dataset()
    if isinstance(corpus_or_dataset, tf.data.Dataset):
        return corpus_or_dataset
    raise TypeError(
        "Expected a ParallelCorpus or a tf.data.Dataset of (source, target) strings, got "
        f"{type(corpus_or_dataset).__name__}"
    )


def _tokenize_pairs(tokenizer: SubwordTokenizer, max_length: int):
    """Returns a batched map function: string pairs -> ragged ids, over-long pairs removed.

    Targets are kept as ``[bos] + tokens + [eos]`` in one sequence; ``target_ids`` and
    ``labels`` are its two shifted views, cut after padding (see ``_split_target``). That
    stores (and caches) one target sequence per pair instead of two.
    """

    @tf.autograph.experimental.do_not_convert
    def tokenize(sources: tf.Tensor, targets: tf.Tensor) -> dict[str, tf.RaggedTensor]:
        source_tokens = tokenizer.tokenize(sources)
        target_tokens = tokenizer.tokenize(targets)
        rows = tf.shape(sources, out_type=tf.int64)[:1]
        eos = tf.RaggedTensor.from_tensor(tf.fill(tf.concat([rows, [1]], 0), tokenizer.eos_id))
        bos = tf.RaggedTensor.from_tensor(tf.fill(tf.concat([rows, [1]], 0), tokenizer.bos_id))
        source_ids = tf.concat([source_tokens, eos], axis=1)
        target_full = tf.concat([bos, target_tokens, eos], axis=1)
        keep = (source_ids.row_lengths() <= max_length) & (
            target_full.row_lengths() - 1 <= max_length
        )
        return {
            "source_ids": tf.ragged.boolean_mask(source_ids, keep),
            "target_full": tf.ragged.boolean_mask(target_full, keep),
        }

    return tokenize


def _coarse_boundaries(max_length: int) -> list[int]:
    """Powers of two up to ``max_length``: the buckets that sweep up leftover pairs."""
    bounds = [2**k for k in range(3, max(3, math.ceil(math.log2(max_length)))) if 2**k < max_length]
    return bounds + [max_length]


def _assign_batches(
    lengths: tf.Tensor,
    source_lengths: tf.Tensor,
    bounds: Sequence[int],
    batch_tokens: int,
    keep_partial: bool,
    rows_multiple: int = 1,
):
    """Groups pairs into token-budget batches by bucket, without a per-pair loop.

    Within a bucket, pairs are ordered by length and then source length before being cut into
    batches, so a batch holds pairs of nearly equal lengths on both sides (ties keep the pool's
    random order). Without the second key, source padding is several points worse.

    Args:
        lengths: int64 ``[n]`` pair lengths, all ``<= bounds[-1]``.
        source_lengths: int64 ``[n]`` source lengths, ``<= lengths``.
        bounds: Inclusive bucket upper bounds, ascending.
        batch_tokens: Token budget; a bucket with bound ``L`` takes
            ``batch_rows(batch_tokens, L, rows_multiple)`` pairs.
        keep_partial: Whether a bucket's last, incomplete batch is formed or left over.
        rows_multiple: Batch sizes are rounded down to a multiple of this.

    Returns:
        ``(assigned, batch_ids, leftover, num_batches)``: indices into ``lengths`` of the pairs
        placed in batches, their batch ids (non-decreasing, ``0 .. num_batches - 1``), and the
        indices of the pairs not placed.
    """
    bounds_t = tf.constant(bounds, dtype=tf.int64)
    bucket_sizes = tf.constant(
        [batch_rows(batch_tokens, bound, rows_multiple) for bound in bounds], dtype=tf.int64
    )
    bucket = tf.searchsorted(bounds_t, lengths, side="left", out_type=tf.int64)
    scale = bounds[-1] + 1
    order = tf.argsort((bucket * scale + lengths) * scale + source_lengths, stable=True)
    sorted_bucket = tf.gather(bucket, order)
    counts = tf.math.bincount(bucket, minlength=len(bounds), maxlength=len(bounds), dtype=tf.int64)
    position = tf.range(tf.size(bucket, out_type=tf.int64)) - tf.gather(
        tf.cumsum(counts, exclusive=True), sorted_bucket
    )
    batch_in_bucket = position // tf.gather(bucket_sizes, sorted_bucket)
    # Ceiling division keeps each bucket's last, part-filled batch.
    batches_per_bucket = -(-counts // bucket_sizes) if keep_partial else counts // bucket_sizes
    placed = batch_in_bucket < tf.gather(batches_per_bucket, sorted_bucket)
    batch_ids = tf.gather(tf.cumsum(batches_per_bucket, exclusive=True), sorted_bucket)
    batch_ids += batch_in_bucket
    return (
        tf.boolean_mask(order, placed),
        tf.boolean_mask(batch_ids, placed),
        tf.boolean_mask(order, tf.logical_not(placed)),
        tf.reduce_sum(batches_per_bucket),
    )


def _bucket_pool(
    bounds: Sequence[int],
    coarse: Sequence[int],
    batch_tokens: int,
    shuffle: bool,
    drop_remainder: bool,
    rows_multiple: int = 1,
):
    """Returns a map function: a pool of tokenized pairs -> ragged ``[batches, (pairs), (len)]``.

    Pairs first fill full batches of the fine buckets; the few left over (fewer than one batch
    per bucket) fill batches of coarse power-of-two buckets, so a pool yields only a handful of
    part-filled batches instead of one per fine bucket.
    """

    @tf.autograph.experimental.do_not_convert
    def bucket(pool: dict[str, tf.RaggedTensor], seed: tf.Tensor):
        source = pool["source_ids"].merge_dims(0, 1)
        target = pool["target_full"].merge_dims(0, 1)
        if shuffle:
            permutation = tf.random.experimental.stateless_shuffle(
                tf.range(source.nrows()), seed=tf.stack([seed, 0])
            )
            source = tf.gather(source, permutation)
            target = tf.gather(target, permutation)
        # A pair costs max(len(source + eos), len(bos + target)) positions: the larger of its
        # two padded lengths, which is what the token budget must bound.
        lengths = tf.maximum(source.row_lengths(), target.row_lengths() - 1)
        source_lengths = source.row_lengths()
        fine_pairs, fine_ids, leftover, fine_batches = _assign_batches(
            lengths, source_lengths, bounds, batch_tokens, False, rows_multiple
        )
        coarse_pairs, coarse_ids, _, coarse_batches = _assign_batches(
            tf.gather(lengths, leftover),
            tf.gather(source_lengths, leftover),
            coarse,
            batch_tokens,
            not drop_remainder,
            rows_multiple,
        )
        pairs = tf.concat([fine_pairs, tf.gather(leftover, coarse_pairs)], axis=0)
        batch_ids = tf.concat([fine_ids, coarse_ids + fine_batches], axis=0)
        num_batches = fine_batches + coarse_batches
        batched = {
            name: tf.RaggedTensor.from_value_rowids(
                tf.gather(values, pairs), batch_ids, nrows=num_batches
            )
            for name, values in (("source_ids", source), ("target_full", target))
        }
        if shuffle:
            # Otherwise batches would come out shortest bucket first.
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_batches), seed=tf.stack([seed, 1])
            )
            batched = {name: tf.gather(value, order) for name, value in batched.items()}
        return batched

    return bucket


def _pad_batch(
    eos_id: int,
    pad_id: int,
    shapes: Sequence[int] | None,
    batch_tokens: int,
    rows_multiple: int = 1,
):
    """Returns a map function: a ragged batch -> padded ``(features, labels)``.

    Without ``shapes`` a batch is padded to its longest pair. With them (ascending lengths
    ``L``), it is padded to the shortest ``L`` that holds its longest pair and to
    ``batch_rows(batch_tokens, L, rows_multiple)`` rows (rows of padding only, which the loss
    and metrics mask): one shape per ``L``. Every batch fits: it came from a bucket whose bound
    ``B >= L`` is in ``shapes`` and holds at most ``batch_rows(.., B, ..)`` pairs, which is no
    more than ``batch_rows(.., L, ..)``.
    """

    @tf.autograph.experimental.do_not_convert
    def pad(batch: dict[str, tf.RaggedTensor]):
        if shapes is None:
            source_ids = batch["source_ids"].to_tensor(default_value=pad_id)
            full = batch["target_full"].to_tensor(default_value=pad_id)
        else:
            longest = tf.maximum(
                tf.reduce_max(batch["source_ids"].row_lengths()),
                tf.reduce_max(batch["target_full"].row_lengths()) - 1,
            )
            lengths = tf.constant(shapes, tf.int64)
            index = tf.searchsorted(lengths, longest[None])[0]
            length = tf.gather(lengths, index)
            rows = tf.gather(
                tf.constant([batch_rows(batch_tokens, s, rows_multiple) for s in shapes], tf.int64),
                index,
            )
            source_ids = batch["source_ids"].to_tensor(pad_id, shape=tf.stack([rows, length]))
            full = batch["target_full"].to_tensor(pad_id, shape=tf.stack([rows, length + 1]))
        # Padding comes after eos, so dropping the last column leaves each row's eos behind in
        # target_ids, except in the longest row; there it must read as padding.
        target_ids = full[:, :-1]
        target_ids = tf.where(tf.equal(target_ids, eos_id), pad_id, target_ids)
        labels = full[:, 1:]
        return {"source_ids": source_ids, "target_ids": target_ids}, labels

    return pad


def _round_up(bounds: Sequence[int], multiple: int, max_length: int) -> list[int]:
    """Bucket bounds rounded up to a multiple of ``multiple``, capped at ``max_length``."""
    if multiple < 1:
        raise ValueError(f"length_multiple must be >= 1, got {multiple}")
    return sorted({min(-(-bound // multiple) * multiple, max_length) for bound in bounds})


def _fine_boundaries(max_length: int, bucket_boundaries: Sequence[int] | None) -> list[int]:
    if bucket_boundaries is None:
        return default_bucket_boundaries(max_length)
    bounds = sorted({int(b) for b in bucket_boundaries if b < max_length} | {max_length})
    if bounds[0] < 1:
        raise ValueError(f"bucket_boundaries must be positive, got {list(bucket_boundaries)}")
    return bounds


def _bucket_bounds(max_length, bucket_boundaries, length_multiple):
    """``(fine, coarse)`` bucket bounds, rounded when ``length_multiple`` is set."""
    fine = _fine_boundaries(max_length, bucket_boundaries)
    coarse = _coarse_boundaries(max_length)
    if length_multiple is None:
        return fine, coarse
    return (
        _round_up(fine, length_multiple, max_length),
        _round_up(coarse, length_multiple, max_length),
    )


def batch_rows(batch_tokens: int, length: int, rows_multiple: int = 1) -> int:
    """Pairs in a batch of ``length`` tokens: ``batch_tokens // length``, rounded down to a
    multiple of ``rows_multiple`` (the number of devices a batch is split across)."""
    return batch_tokens // length // rows_multiple * rows_multiple


def batch_shapes(
    max_length: int,
    batch_tokens: int,
    length_multiple: int,
    bucket_boundaries: Sequence[int] | None = None,
    rows_multiple: int = 1,
) -> list[tuple[int, int]]:
    """Every ``(batch size, length)`` that ``make_dataset`` emits with ``length_multiple``.

    One shape per bucket length (fine and coarse buckets, rounded up to a multiple of
    ``length_multiple``, the last one ``max_length``), with
    ``batch_rows(batch_tokens, length, rows_multiple)`` rows; source ids, target ids and labels
    all have it. With the default buckets and a multiple of 8 that is ``ceil(max_length / 8)``
    shapes or fewer.
    """
    fine, coarse = _bucket_bounds(max_length, bucket_boundaries, length_multiple)
    return [
        (batch_rows(batch_tokens, length, rows_multiple), length)
        for length in sorted(set(fine) | set(coarse))
    ]


def make_dataset(
    corpus_or_dataset: ParallelCorpus | tf.data.Dataset,
    tokenizer: SubwordTokenizer,
    *,
    batch_tokens: int,
    max_length: int,
    shuffle: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    repeat: bool = False,
    seed: int | None = None,
    cache: bool | str = False,
    bucket_boundaries: Sequence[int] | None = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    drop_remainder: bool = False,
    deterministic: bool | None = None,
    tokenize_batch_size: int = DEFAULT_TOKENIZE_BATCH,
    pool_size: int = DEFAULT_POOL_SIZE,
    length_multiple: int | None = None,
    rows_multiple: int = 1,
) -> tf.data.Dataset:
    """Builds the training input pipeline with token-budget batches.

    Per pair: ``source_ids = tokens + [eos]``, ``target_ids = [bos] + tokens``,
    ``labels = tokens + [eos]``; 0 pads everywhere. Pairs whose ``source_ids`` or
    ``target_ids`` are longer than ``max_length`` are dropped (``count_too_long`` counts them).

    Batching: pairs are gathered into pools of about ``pool_size`` pairs; within a pool each
    pair goes into a length bucket (length = ``max(len(source_ids), len(target_ids))``), and a
    bucket with upper bound ``L`` forms batches of ``batch_tokens // L`` pairs, padded to the
    batch's longest pair. So no batch holds more than ``batch_tokens`` source positions nor
    more than ``batch_tokens`` target positions, padding included. The few pairs left over in
    each pool fill batches of coarser power-of-two buckets (a few part-filled batches per pool).

    Everything works on whole blocks of pairs: strings are tokenized ``tokenize_batch_size`` at
    a time in parallel maps, and bucketing is vectorized per pool. Per-pair tf.data steps
    (``unbatch`` of ragged ids, ``bucket_by_sequence_length``) measured ~6k pairs/s on a
    2-core CPU; this runs several times faster (``benchmarks/pipeline_throughput.py``).

    Shuffling: blocks of ``tokenize_batch_size`` tokenized pairs are shuffled with a buffer of
    ``shuffle_buffer`` pairs, pairs are permuted within each pool, and batches are permuted
    within each pool. Pairs from one block therefore share a pool in every epoch. Without
    ``shuffle``, batches come out shortest bucket first (fine for evaluation).

    Under ``tf.distribute``, pass the result to ``strategy.experimental_distribute_dataset``:
    ``batch_tokens`` is the global budget, split across replicas.

    Args:
        corpus_or_dataset: A ``ParallelCorpus`` or a ``tf.data.Dataset`` of scalar
            ``(source, target)`` ``tf.string`` pairs.
        tokenizer: Shared subword tokenizer of both languages.
        batch_tokens: Token budget per batch, for each side separately (global under
            ``tf.distribute``).
        max_length: Longest ``source_ids`` / ``target_ids`` kept, in tokens incl. bos/eos.
        shuffle: Shuffle (see above).
        shuffle_buffer: Pairs in the block shuffle buffer.
        repeat: Repeat forever; pools then span epoch boundaries.
        seed: Seed of every shuffle. With a seed the pipeline is deterministic: the same seed
            gives the same batches in the same order.
        cache: False, True (cache tokenized ids in memory) or a file path prefix (on disk).
        bucket_boundaries: Inclusive upper lengths of the buckets, e.g. ``[16, 32, 64, 128]``;
            ``max_length`` is added if missing. Defaults to ``default_bucket_boundaries``.
        num_parallel_calls: Parallelism of the tokenizing and bucketing maps.
        drop_remainder: Drop the part-filled batches of each pool instead of emitting them.
        deterministic: Keep element order in parallel maps; defaults to ``seed is not None``.
        tokenize_batch_size: Sentences per tokenizer call.
        pool_size: Pairs bucketed together; larger pools mean fewer part-filled batches.
        length_multiple: Fixed shapes: bucket bounds are rounded up to a multiple of this
            (capped at ``max_length``) and each batch is padded to its bucket's length and to
            ``batch_tokens // length`` rows, so every batch has one of the
            ``batch_shapes(...)``; XLA then compiles one program per shape. ``None``: each
            batch is padded to its longest pair.
        rows_multiple: Batch sizes are rounded down to a multiple of this: the number of
            devices a data-parallel batch is split across. Needs ``length_multiple``.

    Returns:
        A ``tf.data.Dataset`` of ``({"source_ids": int32 [b, s], "target_ids": int32 [b, t]},
        labels int32 [b, t])``.

    Raises:
        ValueError: if ``batch_tokens`` cannot hold one pair of ``max_length`` tokens, or the
            bucket boundaries are not positive.
    """
    if batch_tokens < max_length:
        raise ValueError(
            f"batch_tokens={batch_tokens} cannot hold one pair of max_length={max_length} tokens"
        )
    if rows_multiple < 1:
        raise ValueError(f"rows_multiple must be >= 1, got {rows_multiple}")
    if rows_multiple > 1 and length_multiple is None:
        raise ValueError(
            f"rows_multiple={rows_multiple} (batches split across devices) needs fixed batch "
            "shapes: set length_multiple"
        )
    if batch_rows(batch_tokens, max_length, rows_multiple) < 1:
        raise ValueError(
            f"batch_tokens={batch_tokens} holds {batch_tokens // max_length} pairs of "
            f"max_length={max_length} tokens, fewer than one per device ({rows_multiple}); "
            f"raise batch_tokens to at least {max_length * rows_multiple}"
        )
    # With length_multiple, pairs are bucketed by the rounded bounds, so every bucket's bound is
    # one of the padded shapes (see _pad_batch).
    bounds, coarse = _bucket_bounds(max_length, bucket_boundaries, length_multiple)
    shapes = None if length_multiple is None else sorted(set(bounds) | set(coarse))
    if deterministic is None:
        deterministic = seed is not None

    dataset = _to_pair_dataset(corpus_or_dataset).batch(tokenize_batch_size)
    dataset = dataset.map(
        _tokenize_pairs(tokenizer, max_length),
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )
    if cache:
        dataset = dataset.cache("" if cache is True else str(cache))
    if shuffle:
        blocks = max(1, shuffle_buffer // tokenize_batch_size)
        dataset = dataset.shuffle(blocks, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(max(1, math.ceil(pool_size / tokenize_batch_size)))
    # One random draw per pool seeds its permutations: reproducible with a seed, and different
    # in every pool and epoch.
    dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.random(seed=seed)))
    dataset = dataset.map(
        _bucket_pool(bounds, coarse, batch_tokens, shuffle, drop_remainder, rows_multiple),
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )
    dataset = dataset.unbatch()
    dataset = dataset.map(
        _pad_batch(tokenizer.eos_id, tokenizer.pad_id, shapes, batch_tokens, rows_multiple),
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def count_too_long(
    corpus_or_dataset: ParallelCorpus | tf.data.Dataset,
    tokenizer: SubwordTokenizer,
    max_length: int,
    tokenize_batch_size: int = DEFAULT_TOKENIZE_BATCH,
) -> dict[str, int]:
    """Counts the pairs ``make_dataset`` drops for ``max_length`` (one tokenizing pass).

    Returns:
        ``{"pairs": ..., "kept": ..., "too_long": ...}``.
    """
    tokenize = _tokenize_pairs(tokenizer, max_length)

    def count(sources: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        kept = tokenize(sources, targets)["source_ids"].nrows()
        return tf.stack([tf.shape(sources, out_type=tf.int64)[0], kept])

    counts = (
        _to_pair_dataset(corpus_or_dataset)
        .batch(tokenize_batch_size)
        .map(count, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .reduce(tf.zeros([2], tf.int64), lambda total, batch: total + batch)
    )
    pairs, kept = (int(value) for value in counts.numpy())
    return {"pairs": pairs, "kept": kept, "too_long": pairs - kept}


def padding_efficiency(dataset: tf.data.Dataset, num_batches: int | None = None) -> dict:
    """Measures how much of each batch is real tokens rather than padding.

    Args:
        dataset: Output of ``make_dataset``; with ``repeat=True`` pass ``num_batches``, or
            this never returns.
        num_batches: Stop after this many batches; all of them when None.

    Returns:
        A dict with ``source`` and ``target`` (real tokens / padded positions), ``batches``,
        ``pairs``, ``source_tokens``, ``target_tokens`` (real), ``max_source_tokens_in_batch``,
        ``max_target_tokens_in_batch`` (padded positions, the quantity ``batch_tokens`` bounds)
        and ``mean_batch_size``.
    """
    if num_batches is not None:
        dataset = dataset.take(num_batches)
    batches = pairs = 0
    source_real = source_padded = target_real = target_padded = 0
    max_source = max_target = 0
    for features, labels in dataset.as_numpy_iterator():
        source = features["source_ids"]
        batches += 1
        pairs += source.shape[0]
        source_real += int(np.count_nonzero(source))
        target_real += int(np.count_nonzero(labels))
        source_padded += source.size
        target_padded += labels.size
        max_source = max(max_source, source.size)
        max_target = max(max_target, labels.size)
    return {
        "source": source_real / source_padded if source_padded else math.nan,
        "target": target_real / target_padded if target_padded else math.nan,
        "batches": batches,
        "pairs": pairs,
        "source_tokens": source_real,
        "target_tokens": target_real,
        "max_source_tokens_in_batch": max_source,
        "max_target_tokens_in_batch": max_target,
        "mean_batch_size": pairs / batches if batches else math.nan,
    }
