"""`Translator` input handling and list API, and the config/vocabulary check, on a random
`tiny` model with a small real vocabulary (no training: these are properties of the module)."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.decoding.settings import DecodeSettings
from keras_transformer.translation import model_dir as layout
from keras_transformer.translation.tokenizer import check_vocabulary
from keras_transformer.translation.translator import MIN_SHARD_ROWS, Translator, shard_count

MAX_LENGTH = 16
SETTINGS = DecodeSettings(beam_size=2, batch_size=3, extra_length=3)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, shared_data_dir):
    """A model directory's vocabulary and config (no weights): 120 pieces, Multi30k val."""
    from training.vocab import train_vocab

    keras.utils.set_random_seed(0)  # before any tokenizer: it clears TF's kernel cache
    folder = tmp_path_factory.mktemp("vocab")
    texts = (shared_data_dir / "multi30k" / "val.en").read_text().splitlines()[:300]
    train_vocab(texts, folder / "spm", vocab_size=120, seed=1)
    tokenizer = layout.load_tokenizer(folder)
    config = TransformerConfig.preset(
        "tiny", vocab_size=tokenizer.vocab_size, max_length=MAX_LENGTH
    )
    config.to_json(folder / layout.TRANSFORMER_CONFIG)
    return folder


@pytest.fixture(scope="module")
def translator(vocab_dir):
    config = TransformerConfig.from_json(vocab_dir / layout.TRANSFORMER_CONFIG)
    return Translator(build_transformer(config), layout.load_tokenizer(vocab_dir), SETTINGS)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"eos_id": 5}, "TransformerConfig eos_id=5 but spm.model eos_id=3"),
        ({"pad_id": 7, "bos_id": 6}, "pad_id=7 but spm.model pad_id=0; .* bos_id=6 but spm"),
        ({"vocab_size": 121}, "vocab_size=121 but spm.model has 120 pieces"),
        (
            {"share_embeddings": False, "target_vocab_size": 99},
            "target_vocab_size=99 but spm.model has 120 pieces",
        ),
    ],
)
def test_a_config_that_disagrees_with_its_vocabulary_is_refused(vocab_dir, changes, message):
    tokenizer = layout.load_tokenizer(vocab_dir)
    config = TransformerConfig.from_json(vocab_dir / layout.TRANSFORMER_CONFIG)
    check_vocabulary(config, tokenizer)  # the directory's own config agrees
    with pytest.raises(ValueError, match=message):
        check_vocabulary(config.replace(**changes), tokenizer)
    with pytest.raises(ValueError, match=message):
        Translator(build_transformer(config.replace(**changes)), tokenizer)


def test_loading_a_model_dir_checks_its_config_against_its_vocabulary(vocab_dir, tmp_path):
    for name in (layout.VOCAB, layout.TRANSFORMER_CONFIG):
        (tmp_path / name).write_bytes((vocab_dir / name).read_bytes())
    config = TransformerConfig.from_json(tmp_path / layout.TRANSFORMER_CONFIG)
    config.replace(eos_id=5).to_json(tmp_path / layout.TRANSFORMER_CONFIG)
    # Refused before any checkpoint is looked for (the directory has none).
    with pytest.raises(ValueError, match="transformer_config.json eos_id=5 but spm.model eos_id=3"):
        layout.load_transformer(tmp_path)
    with pytest.raises(ValueError, match="transformer_config.json eos_id=5"):
        layout.load_translator(tmp_path)


def test_tokenizer_reads_the_special_ids_of_its_model(vocab_dir):
    tokenizer = layout.load_tokenizer(vocab_dir)
    ids = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id)
    assert ids == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 120


def test_sources_keep_max_length_minus_one_tokens_then_eos(translator):
    tokenizer, eos = translator.tokenizer, translator.tokenizer.eos_id
    long = "A man in a blue shirt is standing on a ladder cleaning windows of a tall building."
    short = "A dog."
    long_tokens = tokenizer.tokenize(tf.constant([long])).numpy()[0].tolist()
    short_tokens = tokenizer.tokenize(tf.constant([short])).numpy()[0].tolist()
    assert len(long_tokens) > MAX_LENGTH and len(short_tokens) < MAX_LENGTH - 1
    source_ids, empty, truncated = translator.encode(tf.constant([long, short, ""]))
    # The full positional table is used: 15 tokens + eos, not 14 (the old evaluate path).
    assert source_ids.shape == (3, MAX_LENGTH)
    assert source_ids[0].numpy().tolist() == long_tokens[: MAX_LENGTH - 1] + [eos]
    row = short_tokens + [eos]
    assert source_ids[1].numpy().tolist() == row + [0] * (MAX_LENGTH - len(row))
    assert source_ids[2].numpy().tolist() == [eos] + [0] * (MAX_LENGTH - 1)
    assert truncated.numpy().tolist() == [True, False, False]
    assert empty.numpy().tolist() == [False, False, True]


def test_list_api_handles_awkward_input_and_keeps_the_order(translator):
    sentences = [
        "",
        " \t ",
        b"A dog \xff runs \xc3.",
        "A dog \ufffd runs \ufffd.",
        "Two dogs play in the snow near a big red house.",
        "A man.",
        "A woman rides a bike.",
    ]
    out = translator.translate(sentences)
    assert out[:2] == ["", ""]
    assert out[2] == out[3] and out[2]  # invalid UTF-8 reads as U+FFFD
    assert translator.translate(sentences[::-1]) == out[::-1]
    assert translator.translate([]) == []
    with pytest.raises(TypeError, match="list of sentences"):
        translator.translate("A dog runs.")
    # Batches of 3 sorted by length give what one sentence at a time gives.
    alone = [translator.translate([s])[0] for s in sentences]
    assert alone == out


def test_nbest_and_greedy_list_api_match_the_signatures(translator):
    sentences = ["A man.", "A woman rides a bike.", ""]
    nbest = translator.translate_nbest(sentences)
    beam = translator.beam(tf.constant(sentences))
    assert [[text for text, _ in row] for row in nbest] == [
        [t.decode() for t in row] for row in beam["nbest_translations"].numpy()
    ]
    scores = np.array([[score for _, score in row] for row in nbest])
    assert scores.shape == (3, SETTINGS.beam_size)
    assert np.all(np.diff(scores[:2], axis=1) <= 0) and scores[2].tolist() == [0.0, 0.0]
    greedy = [t.decode() for t in translator.greedy(tf.constant(sentences))["translations"].numpy()]
    assert translator.translate(sentences, beam_size=1) == greedy


def test_describe_records_what_the_module_does(translator):
    record = translator.describe()
    assert record["decode_settings"] == dataclasses.asdict(SETTINGS)
    assert record["max_source_tokens"] == MAX_LENGTH - 1
    assert record["nbest"] == SETTINGS.beam_size


def test_shards_are_the_most_powers_of_two_of_four_rows_or_more():
    """Catches a shard count that ignores `concurrent_searches` or makes shards of fewer than
    `MIN_SHARD_ROWS` rows (at batch 1, four searches of one repeated sentence)."""
    expected = {1: 1, 2: 1, 4: 1, 8: 2, 16: 4, 24: 4, 32: 4, 64: 4}
    for bucket, count in expected.items():
        assert int(shard_count(bucket, 4)) == count, bucket
        assert int(shard_count(tf.constant(bucket), 4)) == count, bucket
    assert int(shard_count(64, 8)) == 8 and int(shard_count(64, 2)) == 2
    assert int(shard_count(64, 1)) == 1
    assert MIN_SHARD_ROWS == 4
    with pytest.raises(ValueError, match="concurrent_searches must be 1, 2, 4 or 8, got 3"):
        Translator(
            build_transformer(TransformerConfig.preset("tiny")),
            None,
            SETTINGS,
            concurrent_searches=3,
        )


def test_xla_compiled_search_equals_the_op_by_op_search_at_every_bucket_edge(translator):
    """`jit_compile=True` pads the ids to a shape bucket, searches it in shards at once and
    cuts the results back. Batches of 1, 3 (bucket 4, one shard), 8 (two shards), 9 (bucket 16,
    7 repeated rows, four shards) and lengths 2, 9 (bucket 16) and 16 (the positional table's
    end, never padded past it) give the op-by-op search's ids, width and scores; the recorded
    settings say it is compiled."""
    compiled = Translator(
        translator.model, translator.tokenizer, SETTINGS, jit_compile=True, concurrent_searches=4
    )
    assert compiled.describe()["jit_compile"] is True
    assert compiled.describe()["concurrent_searches"] == 4
    default = Translator(translator.model, translator.tokenizer, SETTINGS, jit_compile=True)
    assert default.describe()["concurrent_searches"] == 2
    assert translator.describe()["jit_compile"] is False
    assert translator.describe()["concurrent_searches"] == 2  # op by op too
    rng = np.random.default_rng(3)
    config = translator.model.config
    for batch, length in ((1, 2), (3, 9), (8, 5), (9, 16), (2, 16)):
        ids = rng.integers(4, config.vocab_size, size=(batch, length)).astype("int32")
        # Rows of different real lengths: eos, then padding.
        for row in range(batch):
            end = rng.integers(1, length + 1)
            ids[row, end - 1] = config.eos_id
            ids[row, end:] = config.pad_id
        ids = tf.constant(ids)
        for signature in ("greedy_ids", "beam_ids"):
            want = getattr(translator, signature)(ids)
            got = getattr(compiled, signature)(ids)
            where = f"{signature} batch {batch} length {length}"
            assert got["target_ids"].shape == want["target_ids"].shape, where
            np.testing.assert_array_equal(got["target_ids"], want["target_ids"], err_msg=where)
            np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-4, err_msg=where)
    sentences = ["A man.", "", "Two dogs play in the snow near a big red house."]
    assert compiled.translate(sentences) == translator.translate(sentences)
