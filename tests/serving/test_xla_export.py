"""An export whose searches XLA compiles (`serving.export --jit-compile`), on the session's tiny
trained model: marked for XLA with only allowed ops, translating as the op-by-op export, and
served only by a server started with `--xla_cpu_compilation_enabled=true`, as TF Serving
(its `main.cc` disables XLA otherwise; the compiler then fails with INTERNAL "XLA compilation
disabled", during warmup, so the version never loads). Runs against tensorflow_model_server
when installed, else the devserver (model_server.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from tiny_run import tiny_export, tiny_model_dir

from keras_transformer.translation import model_dir as layout
from serving.client import TranslationClient
from serving.export import export
from serving.graph_ops import decoding_step_ops, disallowed_ops, xla_compiled_functions
from serving.model_config import make_model_server_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data_dir):
    return tiny_model_dir(tmp_path_factory, shared_data_dir)


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory, shared_data_dir):
    """The op-by-op export of the session and the same weights exported with --jit-compile."""
    xla = tmp_path_factory.mktemp("xla_export") / "transformer" / "1"
    return {
        "plain": tiny_export(tmp_path_factory, shared_data_dir) / "1",
        "xla": export(model_dir, xla, jit_compile=True),
    }


@pytest.fixture(scope="module")
def sentences(shared_data_dir):
    lines = (shared_data_dir / "multi30k" / "test_2016_flickr.en").read_text().splitlines()
    return lines[:24]


def test_jit_export_is_marked_for_xla_and_keeps_to_the_op_allowlist(exports):
    assert xla_compiled_functions(exports["xla"])
    assert not xla_compiled_functions(exports["plain"])
    assert disallowed_ops(exports["xla"]) == []
    record = json.loads((exports["xla"] / "assets.extra" / "export.json").read_text())
    assert record["jit_compile"] is True
    for signature in ("greedy_ids", "beam_ids"):
        assert decoding_step_ops(exports["xla"], signature)["xla_compiled"], signature
        assert not decoding_step_ops(exports["plain"], signature)["xla_compiled"], signature


def test_jit_export_translates_as_the_op_by_op_export(exports, sentences):
    """Every text signature on batches of 1, 3, 9 and 24 sentences (buckets 1, 4, 16, 24), and
    the id signatures: same translations, n-best and ids, scores within float rounding."""
    import tensorflow_text  # noqa: F401 - the SentencePiece ops of the graphs

    plain = tf.saved_model.load(str(exports["plain"])).signatures
    xla = tf.saved_model.load(str(exports["xla"])).signatures
    start = 0
    for size in (1, 3, 9, 11):
        text = tf.constant(sentences[start : start + size])
        start += size
        for signature in ("serving_default", "beam", "greedy"):
            want, got = plain[signature](text=text), xla[signature](text=text)
            assert sorted(got) == sorted(want)
            for key in want:
                where = f"{signature} {key}, {size} sentences"
                if key.endswith("scores"):
                    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=where)
                else:
                    np.testing.assert_array_equal(got[key], want[key], err_msg=where)
    ids = tf.constant([[40, 41, 42, 3, 0, 0], [50, 3, 0, 0, 0, 0], [60, 61, 62, 63, 64, 3]])
    for signature in ("greedy_ids", "beam_ids"):
        want, got = plain[signature](source_ids=ids), xla[signature](source_ids=ids)
        np.testing.assert_array_equal(got["target_ids"], want["target_ids"], err_msg=signature)
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-4, err_msg=signature)


def test_jit_export_is_served_only_with_xla_cpu_compilation_enabled(
    exports, model_dir, sentences, serve_models
):
    config = make_model_server_config({"transformer": exports["xla"].parent})
    with pytest.raises(RuntimeError, match="XLA compilation disabled"):
        serve_models(config)
    server = serve_models(config, xla_cpu_compilation_enabled=True)
    client = TranslationClient(server.address, model="transformer", retries=0)
    translator, _ = layout.load_translator(model_dir, jit_compile=True)
    assert client.translate(sentences[:5]) == translator.translate(sentences[:5])
    client.close()
