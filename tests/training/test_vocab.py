"""Tests of vocabulary training and the SubwordTokenizer, with tiny vocabularies on Multi30k."""

import json

import pytest
import sentencepiece as spm
import tensorflow as tf

from keras_transformer.translation.tokenizer import SubwordTokenizer
from training.corpus import load_corpus
from training.vocab import main, train_vocab

VOCAB_SIZE = 500
SAMPLE_SIZE = 6000


@pytest.fixture(scope="module")
def train_corpus(shared_data_dir):
    return load_corpus(f"text:{shared_data_dir}/multi30k/train", "en", "de")


@pytest.fixture(scope="module")
def vocab(train_corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("vocab") / "spm"
    summary = train_vocab(train_corpus, prefix, VOCAB_SIZE, "unigram", SAMPLE_SIZE, seed=1)
    return summary


@pytest.fixture(scope="module")
def tokenizer(vocab):
    return SubwordTokenizer(vocab["model"])


@pytest.fixture(scope="module")
def test_sentences(shared_data_dir):
    corpus = load_corpus(f"text:{shared_data_dir}/multi30k/test_2016_flickr", "en", "de")
    return corpus.sources[:200] + corpus.targets[:200]


def test_special_ids_and_summary(vocab, tokenizer):
    processor = spm.SentencePieceProcessor(model_file=vocab["model"])
    pieces = [processor.id_to_piece(i) for i in range(4)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (
        0,
        1,
        2,
        3,
    )
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == vocab["vocab_size"] == VOCAB_SIZE
    assert vocab["sentences"] == SAMPLE_SIZE  # A bounded sample of both sides.
    assert vocab["vocab"].endswith(".vocab")


def test_same_seed_same_model(train_corpus, vocab, tmp_path):
    again = train_vocab(train_corpus, tmp_path / "again", VOCAB_SIZE, "unigram", SAMPLE_SIZE, 1)
    first = spm.SentencePieceProcessor(model_file=vocab["model"])
    second = spm.SentencePieceProcessor(model_file=again["model"])
    # Pieces, not file bytes: the file also records the output path.
    pieces = [first.id_to_piece(i) for i in range(first.get_piece_size())]
    assert pieces == [second.id_to_piece(i) for i in range(second.get_piece_size())]


def test_round_trip_on_real_sentences(tokenizer, test_sentences):
    ids = tokenizer.tokenize(tf.constant(test_sentences))
    assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
    assert ids.nrows() == len(test_sentences)
    flat = set(ids.flat_values.numpy().tolist())
    assert not flat & {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    texts = [text.decode() for text in tokenizer.detokenize_ragged(ids).numpy()]
    rows = zip(texts, test_sentences, ids, strict=True)
    known = [(text, sentence) for text, sentence, row in rows if tokenizer.unk_id not in row]
    # The rest hold characters unseen in the vocabulary's sample.
    assert len(known) >= 0.95 * len(test_sentences)
    for text, sentence in known:
        assert text == " ".join(sentence.split())  # SentencePiece collapses runs of spaces.


def test_scalar_tokenize(tokenizer):
    ids = tokenizer.tokenize("A dog runs.")
    assert ids.shape.rank == 1 and ids.dtype == tf.int32
    assert tokenizer.detokenize(ids).numpy().decode() == "A dog runs."


def test_detokenize_strips_eos_onwards_and_drops_pad_and_bos(tokenizer):
    sentences = ["A dog runs.", "Zwei Katzen schlafen auf dem Sofa."]
    ids = tokenizer.tokenize(tf.constant(sentences)).to_tensor()
    junk = tf.fill([2, 2], 42)
    pad = tf.zeros([2, 1], tf.int32)
    bos = tf.fill([2, 1], tokenizer.bos_id)
    eos = tf.fill([2, 1], tokenizer.eos_id)
    decoded = tf.concat([bos, ids, pad, eos, junk, eos, pad], axis=1)
    assert [t.decode() for t in tokenizer.detokenize(decoded).numpy()] == sentences
    no_eos = tf.concat([bos, ids], axis=1)
    assert [t.decode() for t in tokenizer.detokenize(no_eos).numpy()] == sentences


def test_traced_graph_uses_only_sentencepiece_and_core_ops(tokenizer):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def round_trip(text):
        return tokenizer.detokenize(tokenizer.tokenize(text).to_tensor())

    graph = round_trip.get_concrete_function().graph.as_graph_def()
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    sentencepiece_ops = {"SentencepieceOp", "SentencepieceTokenizeOp", "SentencepieceDetokenizeOp"}
    assert {"SentencepieceTokenizeOp", "SentencepieceDetokenizeOp"} <= ops
    not_core = {op for op in ops - sentencepiece_ops if not hasattr(tf.raw_ops, op)}
    assert not not_core, f"non-core ops in the traced tokenizer: {sorted(not_core)}"
    assert "EagerPyFunc" not in ops and "PyFunc" not in ops


def test_saved_model_export_keeps_model_file_as_asset(tokenizer, tmp_path):
    module = tf.Module()
    module.tokenizer = tokenizer
    module.detokenize = tf.function(
        lambda text: tokenizer.detokenize(tokenizer.tokenize(text).to_tensor()),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    tf.saved_model.save(module, str(tmp_path / "export"))
    assert (tmp_path / "export" / "assets" / "spm.model").is_file()
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    assert loaded.detokenize(tf.constant(["A dog runs."])).numpy().tolist() == [b"A dog runs."]


def test_model_with_other_special_ids_is_rejected(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 50),
        model_prefix=str(tmp_path / "default_ids"),
        vocab_size=20,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match=r"default_ids.model has \(pad, unk, bos, eos\) ids"):
        SubwordTokenizer(tmp_path / "default_ids.model")


def test_command_line_trains_bpe_and_prints_json(shared_data_dir, tmp_path, capsys):
    output = tmp_path / "cli" / "spm"
    argv = [
        "--corpus",
        f"text:{shared_data_dir}/multi30k/test_2016_flickr",
        "--source-lang",
        "en",
        "--target-lang",
        "de",
        "--output",
        str(output),
        "--vocab-size",
        "300",
        "--model-type",
        "bpe",
        "--sample-size",
        "1000",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model_type"] == "bpe" and summary["vocab_size"] == 300
    assert summary["sentences"] == 1000
    assert (tmp_path / "cli" / "spm.model").is_file() and (tmp_path / "cli" / "spm.vocab").is_file()
    assert "read=1000 kept=1000" in summary["corpus"]


def test_unknown_model_type_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="model_type must be one of"):
        train_vocab(["a b"], tmp_path / "x", 10, "word", 10, 1)
