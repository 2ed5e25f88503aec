"""Parallel-corpus sources (plain text, TSV, WMT SGML, TFDS) behind one spec string.

``load_corpus("text:../shared/data/multi30k/train", "en", "de")`` returns a cleaned, counted
``ParallelCorpus`` held in memory; ``to_dataset()`` turns it into a ``tf.data.Dataset``.
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Pairs are dropped when the longer side has more than `ratio_min_length` whitespace tokens and is
# more than `max_length_ratio` times longer than the shorter side. Whitespace tokens (not
# characters) because they are cheap and language-neutral enough for European pairs; measured on
# Multi30k train this drops exactly the 2 pairs whose German side is "@@".
DEFAULT_MAX_LENGTH_RATIO = 3.0
DEFAULT_RATIO_MIN_LENGTH = 5


class CorpusError(ValueError):
    """A corpus cannot be read as a parallel corpus (missing files, misaligned sides, bad spec)."""


@dataclasses.dataclass
class CorpusStats:
    """Counts of what happened to each pair read from a corpus.

    Attributes:
        read: Pairs read from the source (before any filtering).
        kept: Pairs kept.
        empty: Pairs dropped because one side is empty or whitespace-only.
        too_long_ratio: Pairs dropped by the length-ratio filter.
        invalid_utf8: Pairs dropped because one side is not valid UTF-8.
        bad_columns: TSV lines dropped because they do not have the expected number of columns.
    """

    read: int = 0
    kept: int = 0
    empty: int = 0
    too_long_ratio: int = 0
    invalid_utf8: int = 0
    bad_columns: int = 0

    @property
    def dropped(self) -> int:
        """Number of pairs read but not kept."""
        return self.read - self.kept

    def report(self) -> str:
        """One-line summary, e.g. ``read=29000 kept=28998 empty=0 too_long_ratio=2 ...``."""
        fields = dataclasses.asdict(self)
        return " ".join(f"{name}={value}" for name, value in fields.items())


@dataclasses.dataclass
class ParallelCorpus:
    """Aligned source and target sentences held in memory as Python strings.

    Memory: a Python ``str`` costs ~50 bytes plus its text, so the 4.5M pairs of WMT14 en-de train
    take roughly 1-2 GB; Multi30k and the newstest sets are a few MB.

    Attributes:
        sources: Source sentences.
        targets: Target sentences, ``targets[i]`` translates ``sources[i]``.
        source_lang: Language code of ``sources`` (e.g. ``"en"``).
        target_lang: Language code of ``targets``.
        name: The spec string the corpus was loaded from.
        stats: What was read, kept and dropped.
    """

    sources: list[str]
    targets: list[str]
    source_lang: str
    target_lang: str
    name: str = ""
    stats: CorpusStats = dataclasses.field(default_factory=CorpusStats)

    def __post_init__(self):
        if len(self.sources) != len(self.targets):
            raise CorpusError(
                f"ParallelCorpus {self.name!r} has {len(self.sources)} sources but "
                f"{len(self.targets)} targets"
            )

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return zip(self.sources, self.targets, strict=True)

    def __str__(self) -> str:
        return self.report()

    def report(self) -> str:
        """One-line summary of the corpus and its cleaning counts."""
        return (
            f"{self.name} ({self.source_lang}->{self.target_lang}): {len(self)} pairs; "
            f"{self.stats.report()}"
        )

    def texts(self) -> Iterator[str]:
        """All sentences of both sides, sources first (for vocabulary training)."""
        yield from self.sources
        yield from self.targets

    def to_dataset(self):
        """Returns a ``tf.data.Dataset`` of ``(source, target)`` scalar ``tf.string`` pairs."""
        import tensorflow as tf  # Lazy: reading and cleaning corpora does not need TensorFlow.

        return tf.data.Dataset.from_tensor_slices(
            (
                tf.constant(self.sources, dtype=tf.string),
                tf.constant(self.targets, dtype=tf.string),
            )
        )


# --------------------------------------------------------------------------------------------
# Cleaning shared by every source.


def _ratio_too_large(source: str, target: str, max_ratio: float, min_length: int) -> bool:
    source_length = len(source.split())
    target_length = len(target.split())
    longer = max(source_length, target_length)
    shorter = max(1, min(source_length, target_length))
    return longer > min_length and longer > max_ratio * shorter


def _clean_pairs(
    pairs: Iterable[tuple[bytes | str, bytes | str]],
    stats: CorpusStats,
    max_length_ratio: float | None,
    ratio_min_length: int,
) -> tuple[list[str], list[str]]:
    """Decodes, strips and filters raw pairs, counting each reason for dropping one into stats."""
    sources: list[str] = []
    targets: list[str] = []
    for raw_source, raw_target in pairs:
        stats.read += 1
        try:
            # Decode per line so one bad byte costs one pair, not the file; a pair is dropped
            # whole because keeping one side would misalign everything after it.
            source = raw_source.decode("utf-8") if isinstance(raw_source, bytes) else raw_source
            target = raw_target.decode("utf-8") if isinstance(raw_target, bytes) else raw_target
        except UnicodeDecodeError:
            stats.invalid_utf8 += 1
            continue
        source = source.strip()
        target = target.strip()
        if not source or not target:
            stats.empty += 1
            continue
        if max_length_ratio is not None and _ratio_too_large(
            source, target, max_length_ratio, ratio_min_length
        ):
            stats.too_long_ratio += 1
            continue
        sources.append(source)
        targets.append(target)
    stats.kept = len(sources)
    return sources, targets


def _finish(
    name: str,
    pairs: Iterable[tuple[bytes | str, bytes | str]],
    source_lang: str,
    target_lang: str,
    max_length_ratio: float | None,
    ratio_min_length: int,
    stats: CorpusStats | None = None,
) -> ParallelCorpus:
    stats = stats if stats is not None else CorpusStats()
    sources, targets = _clean_pairs(pairs, stats, max_length_ratio, ratio_min_length)
    corpus = ParallelCorpus(sources, targets, source_lang, target_lang, name=name, stats=stats)
    logger.info("Loaded corpus %s", corpus.report())
    return corpus


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _split_lines(data: bytes) -> list[bytes]:
    # Split on b"\n" only: str.splitlines() would also split on U+2028, U+0085 etc. inside a
    # sentence and silently misalign the two sides.
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _find_side(prefix: str, lang: str) -> Path:
    plain = Path(f"{prefix}.{lang}")
    gzipped = Path(f"{prefix}.{lang}.gz")
    if plain.is_file():
        return plain
    if gzipped.is_file():
        return gzipped
    raise CorpusError(f"No {lang!r} side for text corpus {prefix!r}: neither {plain} nor {gzipped}")


# --------------------------------------------------------------------------------------------
# Sources. Each takes the part of the spec after "kind:" plus its options.


def load_text(
    prefix: str,
    source_lang: str,
    target_lang: str,
    *,
    max_length_ratio: float | None = DEFAULT_MAX_LENGTH_RATIO,
    ratio_min_length: int = DEFAULT_RATIO_MIN_LENGTH,
) -> ParallelCorpus:
    """Loads line-aligned ``PREFIX.{source_lang}`` / ``PREFIX.{target_lang}`` files.

    Either side may be gzipped (``PREFIX.en.gz``); the plain file wins when both exist.

    Raises:
        CorpusError: if a side is missing or the two files have different line counts.
    """
    source_path = _find_side(prefix, source_lang)
    target_path = _find_side(prefix, target_lang)
    source_lines = _split_lines(_read_bytes(source_path))
    target_lines = _split_lines(_read_bytes(target_path))
    if len(source_lines) != len(target_lines):
        raise CorpusError(
            f"Line counts differ: {source_path} has {len(source_lines)} lines but "
            f"{target_path} has {len(target_lines)} lines"
        )
    return _finish(
        f"text:{prefix}",
        zip(source_lines, target_lines, strict=True),
        source_lang,
        target_lang,
        max_length_ratio,
        ratio_min_length,
    )


def load_tsv(
    path: str,
    source_lang: str,
    target_lang: str,
    *,
    columns: Iterable[str] | None = None,
    max_length_ratio: float | None = DEFAULT_MAX_LENGTH_RATIO,
    ratio_min_length: int = DEFAULT_RATIO_MIN_LENGTH,
) -> ParallelCorpus:
    """Loads a tab-separated file with one pair per line (``.gz`` allowed).

    Args:
        path: The TSV file.
        source_lang: Language code of the source side.
        target_lang: Language code of the target side.
        columns: What each column holds, e.g. ``("de", "en")`` or ``("id", "en", "de")``; columns
            named neither ``source_lang`` nor ``target_lang`` are ignored. Defaults to
            ``(source_lang, target_lang)``. Lines with another number of columns are dropped
            and counted in ``stats.bad_columns`` (a TAB inside a sentence produces one).
    """
    columns = tuple(columns) if columns is not None else (source_lang, target_lang)
    for lang in (source_lang, target_lang):
        if lang not in columns:
            raise CorpusError(
                f"TSV columns {columns} of {path} name no column for language {lang!r}"
            )
    source_index = columns.index(source_lang)
    target_index = columns.index(target_lang)
    stats = CorpusStats()

    def pairs() -> Iterator[tuple[bytes, bytes]]:
        for line in _split_lines(_read_bytes(Path(path))):
            fields = line.split(b"\t")
            if len(fields) != len(columns):
                stats.read += 1
                stats.bad_columns += 1
                continue
            yield fields[source_index], fields[target_index]

    if not Path(path).is_file():
        raise CorpusError(f"TSV corpus file not found: {path}")
    return _finish(
        f"tsv:{path}",
        pairs(),
        source_lang,
        target_lang,
        max_length_ratio,
        ratio_min_length,
        stats,
    )


_DOC_RE = re.compile(rb"<doc\b[^>]*?\bdocid=\"([^\"]*)\"", re.IGNORECASE)
_SEG_RE = re.compile(rb"<seg\b[^>]*?\bid=\"?([^\"\s>]+)\"?[^>]*>(.*?)</seg>", re.IGNORECASE)


def _read_sgml(path: Path) -> dict[tuple[str, str], bytes]:
    """Maps (docid, seg id) to the raw segment text of one WMT SGML file."""
    segments: dict[tuple[str, str], bytes] = {}
    docid = ""
    # Regexes, not an XML parser: real WMT files carry unescaped "&" and are not well-formed XML.
    for line in _split_lines(_read_bytes(path)):
        doc_match = _DOC_RE.search(line)
        if doc_match:
            docid = doc_match.group(1).decode("utf-8", errors="replace")
        for seg_match in _SEG_RE.finditer(line):
            key = (docid, seg_match.group(1).decode("ascii", errors="replace"))
            if key in segments:
                raise CorpusError(f"Duplicate segment docid={key[0]!r} id={key[1]!r} in {path}")
            segments[key] = seg_match.group(2)
    return segments


def _unescape(raw: bytes) -> bytes | str:
    try:
        return html.unescape(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return raw  # Counted as invalid UTF-8 by _clean_pairs.


def load_sgml(
    prefix: str,
    source_lang: str,
    target_lang: str,
    *,
    max_length_ratio: float | None = None,
    ratio_min_length: int = DEFAULT_RATIO_MIN_LENGTH,
) -> ParallelCorpus:
    """Loads WMT SGML ``PREFIX-src.{source_lang}.sgm`` and ``PREFIX-ref.{target_lang}.sgm``.

    Segments are paired by (docid, seg id), not by position, and their text is entity-decoded
    (``&quot;`` -> ``"``). The length-ratio filter is off by default because test sets must
    be scored in full.

    Raises:
        CorpusError: if a file is missing or the two files do not hold the same segment ids.
    """
    source_path = Path(f"{prefix}-src.{source_lang}.sgm")
    target_path = Path(f"{prefix}-ref.{target_lang}.sgm")
    for path in (source_path, target_path):
        if not path.is_file():
            raise CorpusError(f"SGML file not found for spec sgml:{prefix}: {path}")
    source_segments = _read_sgml(source_path)
    target_segments = _read_sgml(target_path)
    if source_segments.keys() != target_segments.keys():
        only_source = sorted(source_segments.keys() - target_segments.keys())
        only_target = sorted(target_segments.keys() - source_segments.keys())
        raise CorpusError(
            f"Segment ids differ: {source_path} has {len(source_segments)} segments and "
            f"{target_path} has {len(target_segments)}; {len(only_source)} only in the source "
            f"(e.g. {only_source[:3]}), {len(only_target)} only in the reference "
            f"(e.g. {only_target[:3]})"
        )
    pairs = (
        (_unescape(source_segments[key]), _unescape(target_segments[key]))
        for key in source_segments  # Source file order.
    )
    return _finish(
        f"sgml:{prefix}", pairs, source_lang, target_lang, max_length_ratio, ratio_min_length
    )


def load_tfds(
    name: str,
    source_lang: str,
    target_lang: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
    max_length_ratio: float | None = DEFAULT_MAX_LENGTH_RATIO,
    ratio_min_length: int = DEFAULT_RATIO_MIN_LENGTH,
) -> ParallelCorpus:
    """Loads a TFDS translation dataset such as ``wmt14_translate/de-en``.

    Args:
        name: TFDS builder name with config, e.g. ``"wmt_t2t_translate/de-en"``.
        source_lang: Feature key of the source side (``"en"``).
        target_lang: Feature key of the target side (``"de"``).
        split: TFDS split, e.g. ``"train"``, ``"validation"``, ``"train[:1%]"``.
        data_dir: Where TFDS keeps prepared datasets (TFDS default when None).
        manual_dir: Where manually downloaded archives are (``DownloadConfig.manual_dir``).
        download: Whether to run ``download_and_prepare``; with False the dataset must already
            be prepared under ``data_dir``.
    """
    import tensorflow_datasets as tfds  # Lazy: slow to import and only this source needs it.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # TFDS raises several types for unknown names and configs.
        raise CorpusError(f"Cannot create TFDS builder {name!r}: {error}") from error
    if download:
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=config)
    elif not Path(builder.data_dir).joinpath("dataset_info.json").is_file():
        raise CorpusError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and download=False"
        )
    features = builder.info.features
    keys = set(features["translation"].keys()) if "translation" in features else set(features)
    for lang in (source_lang, target_lang):
        if lang not in keys:
            raise CorpusError(
                f"TFDS dataset {name!r} has no {lang!r} feature; it has {sorted(keys)}"
            )

    def pairs() -> Iterator[tuple[bytes, bytes]]:
        for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
            record = example.get("translation", example)
            yield record[source_lang], record[target_lang]

    return _finish(
        f"tfds:{name}[{split}]",
        pairs(),
        source_lang,
        target_lang,
        max_length_ratio,
        ratio_min_length,
    )


_SOURCES: dict[str, Callable[..., ParallelCorpus]] = {
    "text": load_text,
    "tsv": load_tsv,
    "sgml": load_sgml,
    "tfds": load_tfds,
}


def load_corpus(spec: str, source_lang: str, target_lang: str, **options: Any) -> ParallelCorpus:
    """Loads a parallel corpus named by a spec string ``KIND:LOCATION``.

    Kinds:
        ``text:PREFIX``  line-aligned ``PREFIX.{lang}`` files, optionally ``.gz``.
        ``tsv:PATH``     one pair per line; option ``columns=("en", "de")``.
        ``sgml:PREFIX``  WMT ``PREFIX-src.{source_lang}.sgm`` + ``PREFIX-ref.{target_lang}.sgm``.
        ``tfds:NAME``    TFDS builder, e.g. ``wmt14_translate/de-en``; options ``split``,
                         ``data_dir``, ``manual_dir``, ``download``.

    Every kind takes ``max_length_ratio`` (None disables the filter) and ``ratio_min_length``.
    Swapping ``source_lang`` and ``target_lang`` reads the other direction from the same files.

    Args:
        spec: The spec string.
        source_lang: Language code of the source side, e.g. ``"en"``.
        target_lang: Language code of the target side, e.g. ``"de"``.
        **options: Options of the chosen kind.

    Returns:
        The cleaned corpus; ``corpus.stats`` counts what was dropped and why.

    Raises:
        CorpusError: for an unknown kind or option, missing files or misaligned data.
    """
    kind, separator, location = spec.partition(":")
    if not separator or not location:
        raise CorpusError(f"Corpus spec {spec!r} is not of the form KIND:LOCATION")
    if kind not in _SOURCES:
        raise CorpusError(
            f"Unknown corpus kind {kind!r} in spec {spec!r}; known: {sorted(_SOURCES)}"
        )
    if source_lang == target_lang:
        raise CorpusError(f"source_lang and target_lang are both {source_lang!r} for {spec!r}")
    loader = _SOURCES[kind]
    accepted = [
        name
        for name, parameter in inspect.signature(loader).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CorpusError(
            f"Unknown options {unknown} for corpus kind {kind!r}; accepted: {accepted}"
        )
    return loader(location, source_lang, target_lang, **options)


def corpus_from_config(
    config: Mapping[str, Any], source_lang: str, target_lang: str
) -> ParallelCorpus:
    """Loads a corpus from a config block, e.g. ``{"spec": "tsv:x.tsv", "columns": ["de", "en"]}``.

    Raises:
        CorpusError: if ``spec`` is missing or an option is unknown.
    """
    options = dict(config)
    if "spec" not in options:
        raise CorpusError(f"Corpus config {dict(config)} has no 'spec' key")
    spec = options.pop("spec")
    # YAML has no tuples; lists are what a config file gives for `columns`.
    options = {
        key: tuple(value) if isinstance(value, list) else value for key, value in options.items()
    }
    return load_corpus(spec, source_lang, target_lang, **options)
