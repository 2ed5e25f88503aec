"""Tests of the parallel-corpus sources on the real corpora in ../shared/data."""

import gzip
import html
import logging
import re

import pytest
import tensorflow_datasets as tfds

from training.corpus import CorpusError, corpus_from_config, load_corpus

MULTI30K_TRAIN_PAIRS = 29_000
NEWSTEST2014_SEGMENTS = 3_003


class TinyTranslate(tfds.core.GeneratorBasedBuilder):
    """A local TFDS translation builder shaped like ``wmt14_translate/de-en`` (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]
    PAIRS = {
        "train": [
            ("A dog runs.", "Ein Hund rennt."),
            ("   ", "Leer."),
            ("Two cats.", "Zwei Katzen."),
        ],
        "validation": [("Hello.", "Hallo.")],
    }

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.Translation(languages=("de", "en"))
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.PAIRS}

    def _generate_examples(self, split):
        for index, (english, german) in enumerate(self.PAIRS[split]):
            yield index, {"en": english, "de": german}


@pytest.fixture(scope="module")
def multi30k(shared_data_dir):
    return shared_data_dir / "multi30k"


@pytest.fixture(scope="module")
def newstest2014(shared_data_dir):
    return shared_data_dir / "wmt14" / "newstest2014-deen"


def write_pair(tmp_path, name, sources, targets, langs=("en", "de")):
    """Writes raw lines (bytes or str) to tmp_path/name.{lang}; returns the prefix."""
    for lang, lines in zip(langs, (sources, targets), strict=True):
        data = b"".join(
            (line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines
        )
        (tmp_path / f"{name}.{lang}").write_bytes(data)
    return str(tmp_path / name)


def test_multi30k_text_counts_and_drops_garbage_pairs(multi30k, caplog):
    with caplog.at_level(logging.INFO, logger="training.corpus"):
        corpus = load_corpus(f"text:{multi30k}/train", "en", "de")
    assert corpus.stats.read == MULTI30K_TRAIN_PAIRS
    # Two German lines of Multi30k train are "@@": the length-ratio filter drops exactly those.
    assert corpus.stats.too_long_ratio == 2
    assert corpus.stats.kept == len(corpus) == MULTI30K_TRAIN_PAIRS - 2
    assert "@@" not in corpus.targets
    assert corpus.sources[0] == "Two young, White males are outside near many bushes."
    assert corpus.targets[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert "read=29000 kept=28998" in str(corpus)
    assert "read=29000 kept=28998" in caplog.text

    unfiltered = load_corpus(f"text:{multi30k}/train", "en", "de", max_length_ratio=None)
    assert len(unfiltered) == MULTI30K_TRAIN_PAIRS


def test_either_direction_from_the_same_files(multi30k):
    en_de = load_corpus(f"text:{multi30k}/test_2016_flickr", "en", "de")
    de_en = load_corpus(f"text:{multi30k}/test_2016_flickr", "de", "en")
    assert len(en_de) == len(de_en) == 1000
    assert en_de.sources == de_en.targets and en_de.targets == de_en.sources
    assert (de_en.source_lang, de_en.target_lang) == ("de", "en")


def test_gzipped_text_is_detected(multi30k, tmp_path):
    for lang in ("en", "de"):
        data = (multi30k / f"test_2016_flickr.{lang}").read_bytes()
        (tmp_path / f"flickr.{lang}.gz").write_bytes(gzip.compress(data))
    gzipped = load_corpus(f"text:{tmp_path}/flickr", "en", "de")
    plain = load_corpus(f"text:{multi30k}/test_2016_flickr", "en", "de")
    assert gzipped.sources == plain.sources and gzipped.targets == plain.targets


def test_to_dataset_yields_string_pairs(multi30k):
    corpus = load_corpus(f"text:{multi30k}/test_2016_flickr", "en", "de")
    source, target = next(iter(corpus.to_dataset()))
    assert source.numpy().decode() == corpus.sources[0]
    assert target.numpy().decode() == corpus.targets[0]
    assert corpus.to_dataset().cardinality() == 1000


def test_tsv_with_column_order_and_real_tab_inside_a_sentence(multi30k, tmp_path):
    english = (multi30k / "train.en").read_text(encoding="utf-8").splitlines()
    german = (multi30k / "train.de").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "train.tsv"
    path.write_text("".join(f"{de}\t{en}\n" for en, de in zip(english, german, strict=True)))
    corpus = load_corpus(f"tsv:{path}", "en", "de", columns=("de", "en"))
    # train.de line 7366 holds a literal TAB, so that line has three columns.
    assert corpus.stats.bad_columns == 1
    assert corpus.stats.read == MULTI30K_TRAIN_PAIRS
    assert corpus.sources[0].startswith("Two young, White males")
    assert corpus.targets[0].startswith("Zwei junge weiße Männer")
    assert english[7365] not in corpus.sources


def test_tsv_from_config_block_ignores_other_columns(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("1\tA dog runs.\tEin Hund rennt.\n2\tA cat.\tEine Katze.\n")
    config = {"spec": f"tsv:{path}", "columns": ["id", "en", "de"]}  # As YAML gives it.
    corpus = corpus_from_config(config, "de", "en")
    assert corpus.sources == ["Ein Hund rennt.", "Eine Katze."]
    assert corpus.targets == ["A dog runs.", "A cat."]
    with pytest.raises(CorpusError, match="no 'spec' key"):
        corpus_from_config({"columns": ["en", "de"]}, "en", "de")
    with pytest.raises(CorpusError, match="no column for language 'fr'"):
        load_corpus(f"tsv:{path}", "en", "fr", columns=("id", "en", "de"))


@pytest.mark.parametrize(("source_lang", "target_lang"), [("en", "de"), ("de", "en")])
def test_newstest2014_sgml_both_directions(newstest2014, source_lang, target_lang):
    corpus = load_corpus(f"sgml:{newstest2014}", source_lang, target_lang)
    assert len(corpus) == corpus.stats.read == NEWSTEST2014_SEGMENTS
    english = corpus.sources if source_lang == "en" else corpus.targets
    german = corpus.targets if source_lang == "en" else corpus.sources
    assert english[0] == "Gutach: Increased safety for pedestrians"
    assert german[0] == "Gutach: Noch mehr Sicherheit für Fußgänger"
    entity = re.compile(r"&(quot|amp|lt|gt|apos|#\d+);")
    assert not any(entity.search(text) for text in corpus.sources + corpus.targets)
    assert any("Standard & Poor's" in text for text in english)


def _rewrite_sgml(source, destination, transform_docs=None, escape=False):
    """Copies an SGML file, optionally reordering doc blocks/segments or XML-escaping text."""
    text = source.read_text(encoding="utf-8")
    head, *docs = re.split(r"(?=<doc )", text)
    tail = docs[-1][docs[-1].index("</doc>") + len("</doc>\n") :]
    docs[-1] = docs[-1][: len(docs[-1]) - len(tail)]
    if transform_docs:
        docs = transform_docs(docs)
    body = "".join(docs)
    if escape:
        body = re.sub(
            r"(<seg id=\"\d+\">)(.*?)(</seg>)",
            lambda m: m.group(1) + html.escape(m.group(2)) + m.group(3),
            body,
        )
    destination.write_text(head + body + tail, encoding="utf-8")


def _reverse_docs_and_segments(docs):
    reversed_docs = []
    for doc in reversed(docs):
        lines = doc.splitlines(keepends=True)
        segments = [line for line in lines if line.startswith("<seg")]
        others = [line for line in lines if not line.startswith("<seg")]
        reversed_docs.append(others[0] + "".join(reversed(segments)) + "".join(others[1:]))
    return reversed_docs


def test_sgml_segments_are_matched_by_id_not_position(newstest2014, tmp_path):
    original = load_corpus(f"sgml:{newstest2014}", "en", "de")
    _rewrite_sgml(
        newstest2014.with_name("newstest2014-deen-src.en.sgm"),
        tmp_path / "shuffled-src.en.sgm",
    )
    _rewrite_sgml(
        newstest2014.with_name("newstest2014-deen-ref.de.sgm"),
        tmp_path / "shuffled-ref.de.sgm",
        transform_docs=_reverse_docs_and_segments,
        escape=True,  # Also check entity decoding: "&" -> "&amp;", '"' -> "&quot;".
    )
    shuffled = load_corpus(f"sgml:{tmp_path}/shuffled", "en", "de")
    assert shuffled.sources == original.sources
    assert shuffled.targets == original.targets


def test_sgml_with_missing_segment_names_both_files_and_counts(newstest2014, tmp_path):
    _rewrite_sgml(
        newstest2014.with_name("newstest2014-deen-src.en.sgm"), tmp_path / "cut-src.en.sgm"
    )
    reference = newstest2014.with_name("newstest2014-deen-ref.de.sgm").read_text(encoding="utf-8")
    first_segment = re.search(r"<seg id=\"1\">.*?</seg>\n", reference).group(0)
    (tmp_path / "cut-ref.de.sgm").write_text(reference.replace(first_segment, "", 1))
    with pytest.raises(CorpusError) as error:
        load_corpus(f"sgml:{tmp_path}/cut", "en", "de")
    message = str(error.value)
    assert "cut-src.en.sgm has 3003 segments" in message
    assert "cut-ref.de.sgm has 3002" in message
    assert "10023-schwarzwaelder-bote.de" in message


def test_tfds_source_from_a_local_builder(tmp_path):
    options = {"data_dir": str(tmp_path / "tfds"), "manual_dir": str(tmp_path / "manual")}
    with pytest.raises(CorpusError, match="not prepared"):
        load_corpus("tfds:tiny_translate/de-en", "en", "de", download=False, **options)
    corpus = load_corpus("tfds:tiny_translate/de-en", "en", "de", split="train", **options)
    assert sorted(zip(corpus.sources, corpus.targets, strict=True)) == [
        ("A dog runs.", "Ein Hund rennt."),
        ("Two cats.", "Zwei Katzen."),
    ]
    assert corpus.stats.empty == 1
    validation = load_corpus(
        "tfds:tiny_translate/de-en", "de", "en", split="validation", download=False, **options
    )
    assert (validation.sources, validation.targets) == (["Hallo."], ["Hello."])
    with pytest.raises(CorpusError, match="has no 'fr' feature"):
        load_corpus("tfds:tiny_translate/de-en", "en", "fr", download=False, **options)


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    prefix = write_pair(tmp_path, "bad", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(CorpusError) as error:
        load_corpus(f"text:{prefix}", "en", "de")
    message = str(error.value)
    assert f"{prefix}.en has 3 lines" in message and f"{prefix}.de has 2 lines" in message


def test_bad_pairs_are_dropped_and_counted(tmp_path):
    sources = [
        "A good pair.",
        "",  # Empty source.
        "Only the target is blank.",
        b"Invalid \xff\xfe bytes.",  # Not UTF-8: the whole pair goes.
        # A one-word translation of a long sentence is what the ratio filter is for.
        "one two three four five six seven eight nine ten",
        "Short.",
        "Another good pair.",
    ]
    targets = [
        "Ein gutes Paar.",
        "Leere Quelle.",
        " \t ",
        "Ungültige Bytes.",
        "eins",
        "Kurz.",
        b"Noch ein \xc3\xa4 Paar.",
    ]
    prefix = write_pair(tmp_path, "dirty", sources, targets)
    corpus = load_corpus(f"text:{prefix}", "en", "de")
    assert corpus.sources == ["A good pair.", "Short.", "Another good pair."]
    assert corpus.targets == ["Ein gutes Paar.", "Kurz.", "Noch ein ä Paar."]
    stats = corpus.stats
    assert (stats.read, stats.kept, stats.empty, stats.invalid_utf8, stats.too_long_ratio) == (
        7,
        3,
        2,
        1,
        1,
    )
    assert stats.dropped == 4
    assert "invalid_utf8=1" in corpus.report()
    lenient = load_corpus(f"text:{prefix}", "en", "de", max_length_ratio=20.0)
    assert lenient.stats.too_long_ratio == 0 and len(lenient) == 4


def test_unicode_line_separators_do_not_split_lines(tmp_path):
    prefix = write_pair(tmp_path, "seps", ["one\u2028two", "three\x85"], ["eins", "drei"])
    corpus = load_corpus(f"text:{prefix}", "en", "de")
    assert corpus.sources == ["one\u2028two", "three"]


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("nonsense", {}, "not of the form KIND:LOCATION"),
        ("csv:x", {}, "Unknown corpus kind 'csv'"),
        ("text:/nonexistent/prefix", {}, "neither /nonexistent/prefix.en nor"),
        ("text:x", {"colums": 1}, r"Unknown options \['colums'\]"),
        ("sgml:/nonexistent/newstest", {}, "SGML file not found"),
    ],
)
def test_spec_errors_are_clear(spec, options, match):
    with pytest.raises(CorpusError, match=match):
        load_corpus(spec, "en", "de", **options)
