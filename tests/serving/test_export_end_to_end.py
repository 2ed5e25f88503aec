"""Export a briefly trained tiny model, reload it without keras_transformer, serve it over gRPC."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tiny_run import SETTINGS, tiny_export, tiny_model_dir

from keras_transformer.translation import model_dir as layout
from serving.client import TranslationClient
from serving.export import export
from serving.graph_ops import ALLOWED_OPS, decoding_step_ops, saved_model_ops
from serving.model_config import make_model_server_config

ROOT = Path(__file__).resolve().parents[2]
SIGNATURES = ("serving_default", "beam", "greedy", "greedy_ids", "beam_ids")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data_dir):
    sentences = (shared_data_dir / "multi30k" / "test_2016_flickr.en").read_text().splitlines()
    return tiny_model_dir(tmp_path_factory, shared_data_dir), sentences[:6]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory, shared_data_dir):
    base = tiny_export(tmp_path_factory, shared_data_dir)
    return base, base / "1"


@pytest.fixture(scope="module")
def in_process(trained_run):
    """Translations of the in-memory model through `Translator`'s list API (evaluate's path)."""
    model_dir, sentences = trained_run
    translator, _ = layout.load_translator(model_dir)
    return {
        "greedy": translator.translate(sentences, beam_size=1),
        "beam": translator.translate(sentences),
    }


def test_saved_model_cli_lists_the_signatures(exported):
    cli = Path(sys.executable).with_name("saved_model_cli")
    result = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(exported[1])],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in result.stdout
    assert "inputs['text'] tensor_info:" in result.stdout
    assert "outputs['nbest_translations'] tensor_info:" in result.stdout


def test_every_op_is_core_tensorflow_or_sentencepiece(exported):
    ops = saved_model_ops(exported[1])
    assert {"SentencepieceTokenizeOp", "SentencepieceDetokenizeOp", "While"} <= ops
    assert not ops - ALLOWED_OPS, sorted(ops - ALLOWED_OPS)
    assert not {"PyFunc", "EagerPyFunc", "XlaDynamicUpdateSlice"} & ops


# Kernels one decoding step of the tiny export runs (2 decoder layers), as counted once the
# cache write rows and the step weights were prepared once per search (before: 80-90 more per
# layer), and once the searches gathered without `ops.take`'s negative-index fix-up
# (`take_rows`; before: 318 and 480; the beams' gather of their decoded positions only adds 3).
# At batch 1 a step's time is largely their dispatch, so a change that adds ops to the loop
# body must say so here.
STEP_OPS = {"greedy_ids": 309, "beam_ids": 419}


def test_a_decoding_step_runs_no_more_ops_than_counted(exported):
    for signature, budget in STEP_OPS.items():
        counted = decoding_step_ops(exported[1], signature)
        assert 0 < counted["ops"] <= budget, (signature, counted["ops"], counted["by_type"])
        assert counted["by_type"].get("MatMul", 0) >= 4  # the loop body really is a step
        # The batch's shards call one traced search: one copy of the loop, not one per shard
        # of every branch (three with two concurrent searches).
        assert counted["copies"] == 1, (signature, counted["copies"])
    with pytest.raises(KeyError, match="no signature 'nope'"):
        decoding_step_ops(exported[1], "nope")


def test_export_layout_and_refusals(exported, trained_run):
    base, version = exported
    assert (version / "assets" / "spm.model").is_file()
    warmup = version / "assets.extra" / "tf_serving_warmup_requests"
    from tensorflow_serving.apis import prediction_log_pb2

    logs = [
        prediction_log_pb2.PredictionLog.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(str(warmup))
    ]
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
        "serving_default",
        "greedy",
    ]
    assert json.loads((version / "assets.extra" / "transformer_config.json").read_text())
    # The decoding is the run's decode_settings.json (beam 3, 2 returned), not the defaults.
    record = json.loads((version / "assets.extra" / "export.json").read_text())
    assert record["decode_settings"] == SETTINGS.to_dict()
    assert record["max_source_tokens"] == 63
    with pytest.raises(FileExistsError, match="versions are immutable"):
        export(trained_run[0], version)
    with pytest.raises(ValueError, match="numeric version folder"):
        export(trained_run[0], base / "latest")
    assert [p.name for p in base.iterdir()] == ["1"]  # no staging folder left behind


RELOAD = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops
loaded = tf.saved_model.load(sys.argv[1])
assert not [m for m in sys.modules if m.startswith(("keras_transformer", "training", "serving"))]
texts = tf.constant(json.loads(sys.argv[2]))
result = {name: [t.decode() for t in loaded.signatures[name](text=texts)["translations"].numpy()]
          for name in ("serving_default", "greedy")}
print(json.dumps(result))
"""


def test_fresh_process_reload_matches_the_in_process_model(exported, trained_run, in_process):
    sentences = trained_run[1]
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(exported[1]), json.dumps(sentences)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    translations = json.loads(result.stdout.strip().splitlines()[-1])
    assert translations["greedy"] == in_process["greedy"]
    assert translations["serving_default"] == in_process["beam"]


def test_awkward_inputs_give_defined_results(exported):
    loaded = tf.saved_model.load(str(exported[1]))
    texts = tf.constant(["", "   \t ", b"caf\xc3 \xff\xfe", "word " * 100, "A dog runs."])
    for name in ("serving_default", "beam", "greedy"):
        out = loaded.signatures[name](text=texts)
        translations = out["translations"].numpy()
        assert translations[0] == b"" and translations[1] == b""
        assert out["truncated"].numpy().tolist() == [False, False, False, True, False]
    beam = loaded.signatures["beam"](text=texts)
    scores = beam["nbest_scores"].numpy()
    assert beam["nbest_translations"].shape == (5, SETTINGS.nbest)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # n-best sorted, best first
    for name in ("serving_default", "beam", "greedy"):
        empty = loaded.signatures[name](text=tf.constant([], tf.string))
        assert empty["translations"].shape == (0,)
    ids = loaded.signatures["greedy_ids"](source_ids=tf.zeros([0, 4], tf.int32))
    assert ids["target_ids"].shape[0] == 0


def test_evaluate_scores_the_saved_model_as_it_scores_the_model_dir(
    exported, trained_run, shared_data_dir, tmp_path, capsys
):
    """`evaluate --saved-model` translates with the served graph; it equals `--model-dir`."""
    from training.evaluate import evaluate, main

    corpus = f"text:{shared_data_dir}/multi30k/test_2016_flickr"
    from_dir = evaluate(trained_run[0], corpus, "en", "de", limit=20, output=tmp_path / "dir")
    argv = ["--saved-model", str(exported[1]), "--corpus", corpus, "--limit", "20"]
    assert main([*argv, "--output", str(tmp_path / "export")]) == 0
    from_export = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "export").read_text() == (tmp_path / "dir").read_text()
    assert from_export["bleu"] == from_dir["bleu"] and from_export["chrf"] == from_dir["chrf"]
    # Both decoded with the run's decode_settings.json, and say so.
    assert from_export["decode_settings"] == from_dir["decode_settings"] == SETTINGS.to_dict()
    assert from_export["signature"] == "serving_default"
    assert main([*argv, "--beam-size", "2"]) == 2
    assert "decodes as it was exported" in capsys.readouterr().err


def test_fixed_output_length_emits_exactly_n_tokens(trained_run):
    """The benchmarking option: exactly N tokens, end of sentence ignored."""
    translator, _ = layout.load_translator(trained_run[0], fixed_output_length=5)
    source_ids = tf.constant([[5, 6, 7, 3], [8, 3, 0, 0]], tf.int32)
    for name in ("greedy_ids", "beam_ids"):
        target_ids = getattr(translator, name)(source_ids)["target_ids"].numpy()
        assert target_ids.shape == (2, 5) and (target_ids != 0).all()
        assert (target_ids != translator.model.config.eos_id).all()


def test_served_translations_equal_the_in_process_model(
    exported, trained_run, in_process, serve_models
):
    base, _ = exported
    server = serve_models(make_model_server_config({"transformer": base}))
    sentences = trained_run[1]
    with TranslationClient(server.address, model="transformer", max_batch_size=4) as client:
        assert client.translate(sentences) == in_process["beam"]
        assert client.translate(sentences, signature="greedy") == in_process["greedy"]


def test_devserver_command_serves_the_export(exported, trained_run, in_process):
    """The `python -m serving.devserver` process (no test imports in it) loads the real export."""
    base, _ = exported
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.devserver", "--model_base_path", str(base)]
        + ["--model_name", "transformer", "--port", "0"],
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "listening on" in line:
                address = line.strip().rsplit(" ", 1)[-1]
                break
        else:
            pytest.fail("devserver exited: " + "".join(lines[-20:]))
        with TranslationClient(address, model="transformer") as client:
            assert client.translate(trained_run[1]) == in_process["beam"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_bfloat16_export_is_the_bfloat16_model_dir_path_and_keeps_the_allowlist(
    exported, trained_run, shared_data_dir, tmp_path
):
    """`--precision bfloat16`: float32 weights, bfloat16 products, the same ops allowlist, and
    the export translates as `evaluate --model-dir --precision bfloat16` does."""
    import keras

    from training.evaluate import evaluate

    model_dir = trained_run[0]
    version = export(model_dir, tmp_path / "bf16" / "1", precision="bfloat16")
    # The global policy is the caller's again: nothing built later computes in bfloat16.
    assert keras.config.dtype_policy().name == "float32"
    record = json.loads((version / "assets.extra" / "export.json").read_text())
    assert record["compute_dtype"] == "bfloat16"
    float32_record = json.loads((exported[1] / "assets.extra" / "export.json").read_text())
    assert float32_record["compute_dtype"] == "float32"
    ops = saved_model_ops(version)
    assert not ops - ALLOWED_OPS, sorted(ops - ALLOWED_OPS)
    corpus = f"text:{shared_data_dir}/multi30k/test_2016_flickr"
    from_dir = evaluate(
        model_dir, corpus, "en", "de", limit=12, output=tmp_path / "d", precision="bfloat16"
    )
    assert from_dir["precision"] == "bfloat16"
    evaluate(None, corpus, "en", "de", limit=12, output=tmp_path / "e", saved_model=version)
    assert (tmp_path / "e").read_text() == (tmp_path / "d").read_text()
    with pytest.raises(ValueError, match="decodes as it was exported"):
        evaluate(None, corpus, "en", "de", limit=2, saved_model=version, precision="float32")
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'fp16'"):
        layout.load_transformer(model_dir, precision="fp16")
