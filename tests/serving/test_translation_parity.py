"""One translation path: evaluate's list API, the export module in process and the exported
SavedModel served over gRPC give identical outputs on real and awkward inputs.

The three paths batch differently (length-sorted batches of 8; one batch of everything; the
client's batches of at most 16 in input order), so equality also shows that a sentence's
translation does not depend on the rest of its batch.
"""

import numpy as np
import pytest
import tensorflow as tf
from model_server import MAX_BATCH_SIZE
from tiny_run import SETTINGS, tiny_export, tiny_model_dir

from keras_transformer.translation import model_dir as layout
from serving.client import TranslationClient
from serving.model_config import make_model_server_config


@pytest.fixture(scope="module")
def inputs(shared_data_dir):
    """40 Multi30k test sentences, then longer than the model takes, empty, whitespace-only and
    invalid UTF-8 inputs (as bytes, the way a gRPC client may send them)."""
    sentences = (shared_data_dir / "multi30k" / "test_2016_flickr.en").read_text().splitlines()
    real = [line.encode("utf-8") for line in sentences[:40]]
    return real + [
        b" ".join(real[40 - 6 :]),  # about 80 tokens, more than the model's 31
        b"word " * 60,
        b"",
        b"   \t ",
        b"A dog \xff runs \xc3.",
        b"\xfe\xfe",
    ]


@pytest.fixture(scope="module")
def translator(tmp_path_factory, shared_data_dir):
    translator, _ = layout.load_translator(tiny_model_dir(tmp_path_factory, shared_data_dir))
    return translator


@pytest.fixture
def served(tmp_path_factory, shared_data_dir, serve_models):
    """`run(signature, alias, values)`: every output, from the export served over gRPC."""
    base = tiny_export(tmp_path_factory, shared_data_dir)
    server = serve_models(make_model_server_config({"transformer": base}))
    with TranslationClient(server.address, model="transformer") as client:

        def run(signature, alias, values):
            batches = [
                client.predict({alias: values[start : start + MAX_BATCH_SIZE]}, signature)
                for start in range(0, len(values), MAX_BATCH_SIZE)
            ]
            return {key: [row for batch in batches for row in batch[key]] for key in batches[0]}

        yield run


def _trim(target_ids, pad_id):
    """Rows of padded ids without their trailing padding (batches pad to different widths)."""
    return [
        row[: max(np.flatnonzero(row != pad_id), default=-1) + 1].tolist() for row in target_ids
    ]


def test_text_signatures_agree_on_every_path(translator, inputs, served):
    text = tf.constant(inputs)
    listed = {
        "serving_default": translator.translate(inputs),
        "greedy": translator.translate(inputs, beam_size=1),
    }
    nbest = translator.translate_nbest(inputs)
    in_process = {name: getattr(translator, name)(text) for name in ("serving_default", "greedy")}
    beam = translator.beam(text)
    objects = np.array(inputs, dtype=object)
    for name in ("serving_default", "greedy"):
        remote = served(name, "text", objects)
        expected = [t.decode("utf-8") for t in in_process[name]["translations"].numpy()]
        assert listed[name] == expected
        assert [t.decode("utf-8") for t in remote["translations"]] == expected
        assert remote["truncated"] == in_process[name]["truncated"].numpy().tolist()
    remote = served("beam", "text", objects)
    texts = [[t.decode("utf-8") for t in row] for row in beam["nbest_translations"].numpy()]
    assert [[text for text, _ in row] for row in nbest] == texts
    assert [[t.decode("utf-8") for t in row] for row in remote["nbest_translations"]] == texts
    scores = beam["nbest_scores"].numpy()
    np.testing.assert_allclose([[s for _, s in row] for row in nbest], scores, rtol=1e-5)
    np.testing.assert_allclose(np.stack(remote["nbest_scores"]), scores, rtol=1e-5)
    assert listed["serving_default"] == [row[0] for row in texts]

    # The awkward inputs have their defined results, and the outputs are real translations.
    flags = beam["truncated"].numpy().tolist()
    lengths = translator.source_lengths(text).numpy()
    assert flags == (lengths > translator.model.config.max_length - 1).tolist()
    assert flags[40:] == [True, True, False, False, False, False] and not all(flags[:40])
    assert listed["serving_default"][42:44] == ["", ""] and nbest[42][0] == ("", 0.0)
    assert listed["greedy"][44] and listed["greedy"][45]
    assert len(set(listed["serving_default"][:40])) > 5
    assert listed["greedy"] != listed["serving_default"]


def test_id_signatures_agree_on_every_path(translator, inputs, served):
    source_ids, empty, _ = translator.encode(tf.constant(inputs))
    assert source_ids.shape[1] == translator.model.config.max_length  # 63 tokens + eos
    pad_id = translator.tokenizer.pad_id
    greedy_texts = translator.greedy(tf.constant(inputs))["translations"].numpy()
    for name in ("greedy_ids", "beam_ids"):
        local = getattr(translator, name)(source_ids)
        remote = served(name, "source_ids", source_ids.numpy())
        assert _trim(np.stack(remote["target_ids"]), pad_id) == _trim(
            local["target_ids"].numpy(), pad_id
        )
        np.testing.assert_allclose(np.stack(remote["scores"]), local["scores"].numpy(), rtol=1e-5)
        if name == "greedy_ids":
            # The id signature is the text signature's search: detokenized, the same text.
            texts = translator.tokenizer.detokenize(local["target_ids"]).numpy()
            keep = ~empty.numpy()
            assert texts[keep].tolist() == greedy_texts[keep].tolist()


def test_a_sentence_translates_the_same_alone_and_in_a_batch(translator, inputs):
    batched = translator.translate(inputs)
    alone = [
        translator.serving_default(tf.constant([sentence]))["translations"].numpy()[0].decode()
        for sentence in inputs
    ]
    assert alone == batched
    assert SETTINGS.batch_size < len(inputs)  # the list API really made several batches
