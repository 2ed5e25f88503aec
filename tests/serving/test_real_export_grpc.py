"""The real export over gRPC, compared with the same `Translator` decoding in this process:
metadata, the `beam` n-best, the id signatures, warmup before AVAILABLE, and a rollout done as
serving/OPERATIONS.md says. Runs against tensorflow_model_server when installed, else the
devserver (model_server.py).

Two exports of the session's tiny model (tiny_run.py) are served: version 1 is the session's
export (its decode settings: beam 3, 2-best) and version 2 the same weights exported with beam 4
and 4-best (the paper's beam), so the n-best width tells which export answered and differs from
the fake model's 2.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf
from model_server import start_model_server
from tensorflow_serving.apis import prediction_log_pb2
from tiny_run import SETTINGS, tiny_export, tiny_model_dir

from keras_transformer.translation import model_dir as layout
from serving.client import InvalidInputError, ModelNotFoundError, TranslationClient
from serving.export import export
from serving.model_config import make_model_server_config, write_model_server_config

WIDE = SETTINGS.replace(beam_size=4, nbest=4)
# Seconds between scans of the version folders and re-reads of models.config (TF Serving
# rounds them up to whole seconds, model_server.py).
POLL = 0.2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data_dir):
    return tiny_model_dir(tmp_path_factory, shared_data_dir)


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory, shared_data_dir):
    """Version folder per version: 1 is the session's export, 2 the beam-4, 4-best one."""
    wide = tmp_path_factory.mktemp("wide_export") / "transformer" / "2"
    return {
        1: tiny_export(tmp_path_factory, shared_data_dir) / "1",
        2: export(model_dir, wide, beam_size=WIDE.beam_size, nbest=WIDE.nbest),
    }


@pytest.fixture(scope="module")
def translators(model_dir):
    """The in-process `Translator` of version 2, with its decode settings (version 1's is
    compared over gRPC in test_translation_parity.py)."""
    return {2: layout.load_translator(model_dir, settings=WIDE)[0]}


@pytest.fixture(scope="module")
def sentences(shared_data_dir):
    lines = (shared_data_dir / "multi30k" / "test_2016_flickr.en").read_text().splitlines()
    return lines[:16]


def write_config(path, models, versions=None, labels=None):
    """Writes models.config as an editor that saves by renaming would (never half-written)."""
    config = make_model_server_config(models, versions=versions, labels=labels)
    staging = f"{path}.tmp"
    write_model_server_config(config, staging)
    os.replace(staging, path)


@pytest.fixture(scope="module")
def served(exports, tmp_path_factory):
    """A server of model "transformer" = version 2 (beam 4, 4-best), from a models.config file it
    re-reads every POLL seconds; `.config_file` and `.models` let a test add a model."""
    config_file = tmp_path_factory.mktemp("served") / "models.config"
    models = {"transformer": exports[2].parent}
    write_config(config_file, models)
    server = start_model_server(
        config_file,
        file_system_poll_wait_seconds=POLL,
        model_config_file_poll_wait_seconds=POLL,
    )
    server.config_file, server.models = config_file, models
    yield server
    server.stop()


def settle(server):
    """Sleeps long enough for several scans of the version folders."""
    time.sleep(10 * POLL if server.kind == "devserver" else 3.0)


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.1)


def texts(array) -> list:
    """Nested lists of str from a numpy array of bytes."""
    return np.vectorize(lambda value: value.decode("utf-8"), otypes=[object])(array).tolist()


def trim(target_ids, pad_id) -> list:
    """Rows of ids without trailing padding (a batch pads to its longest output)."""
    rows = np.asarray(target_ids)
    return [
        row[: max(np.flatnonzero(row != pad_id), default=-1) + 1].tolist()
        for row in rows.reshape(-1, rows.shape[-1])
    ]


# -- version 2 served alone --------------------------------------------------------------------


def test_status_lists_the_served_version(served):
    with TranslationClient(served.address) as client:
        assert client.status() == [
            {"version": 2, "state": "AVAILABLE", "error_code": 0, "error_message": ""}
        ]


def test_metadata_is_the_in_process_translators_signatures(served, translators):
    with TranslationClient(served.address) as client:
        metadata = client.metadata()

    def spec(tensor):
        return tensor.dtype.name, [-1 if d is None else d for d in tensor.shape.as_list()]

    expected = {}
    for name, function in translators[2].signatures().items():
        concrete = function.get_concrete_function()
        expected[name] = {
            "inputs": {s.name: spec(s) for s in concrete.structured_input_signature[0]},
            "outputs": {alias: spec(t) for alias, t in concrete.structured_outputs.items()},
        }
    assert metadata == expected
    # The export's n-best width, 4 (the fake model's is 2); target ids are [batch, nbest, length].
    assert metadata["beam"]["outputs"]["nbest_scores"] == ("float32", [-1, 4])
    assert metadata["beam"]["outputs"]["nbest_target_ids"] == ("int32", [-1, 4, -1])
    assert metadata["beam_ids"]["inputs"] == {"source_ids": ("int32", [-1, -1])}


def test_beam_nbest_equals_in_process_decoding(served, translators, sentences):
    translator, sentences = translators[2], sentences[:8]
    with TranslationClient(served.address) as client:
        remote = client.predict({"text": sentences}, signature="beam")
    local = translator.beam(tf.constant(sentences))
    nbest = texts(remote["nbest_translations"])
    assert remote["nbest_translations"].shape == (len(sentences), WIDE.nbest)
    assert nbest == texts(local["nbest_translations"].numpy())
    # The list API (evaluate's path: length-sorted batches of SETTINGS.batch_size) agrees too.
    listed = translator.translate_nbest(sentences)
    assert [[text for text, _ in row] for row in listed] == nbest
    assert texts(remote["translations"]) == [row[0] for row in nbest]
    np.testing.assert_allclose(remote["nbest_scores"], local["nbest_scores"].numpy(), rtol=1e-5)
    assert np.all(np.diff(remote["nbest_scores"], axis=1) <= 1e-6)  # best first
    pad_id = translator.tokenizer.pad_id
    assert trim(remote["nbest_target_ids"], pad_id) == trim(
        local["nbest_target_ids"].numpy(), pad_id
    )
    assert remote["truncated"].tolist() == local["truncated"].numpy().tolist()
    assert len({row[0] for row in nbest}) > len(sentences) // 2  # real, varied translations
    assert all(len(set(row)) == WIDE.nbest for row in nbest)  # four distinct hypotheses


@pytest.mark.parametrize("signature", ["greedy_ids", "beam_ids"])
def test_id_signatures_equal_in_process_decoding(served, translators, sentences, signature):
    translator, sentences = translators[2], sentences[:8]
    source_ids, _, _ = translator.encode(tf.constant(sentences))
    with TranslationClient(served.address) as client:
        remote = client.predict({"source_ids": source_ids.numpy()}, signature=signature)
    local = getattr(translator, signature)(source_ids)
    pad_id = translator.tokenizer.pad_id
    assert trim(remote["target_ids"], pad_id) == trim(local["target_ids"].numpy(), pad_id)
    np.testing.assert_allclose(remote["scores"], local["scores"].numpy(), rtol=1e-5)
    # Detokenized, the ids are the text signature's translation with the same search.
    text_signature = "greedy" if signature == "greedy_ids" else "serving_default"
    expected = getattr(translator, text_signature)(tf.constant(sentences))["translations"]
    detokenized = translator.tokenizer.detokenize(tf.constant(remote["target_ids"]))
    assert detokenized.numpy().tolist() == expected.numpy().tolist()


def test_output_filter_is_honored(served, translators, sentences):
    with TranslationClient(served.address) as client:
        outputs = client.predict({"text": sentences[:2]}, "beam", output_filter=["nbest_scores"])
    assert set(outputs) == {"nbest_scores"}
    local = translators[2].beam(tf.constant(sentences[:2]))["nbest_scores"].numpy()
    np.testing.assert_allclose(outputs["nbest_scores"], local, rtol=1e-5)


def test_server_keeps_serving_after_bad_requests(served, translators, sentences):
    with TranslationClient(served.address) as client:
        with pytest.raises(InvalidInputError):
            client.predict({"sentence": ["a"]})
        with pytest.raises(InvalidInputError):
            client.predict({"source_ids": np.array([1.5], np.float32)}, "greedy_ids")
    with (
        TranslationClient(served.address, model="nope") as client,
        pytest.raises(ModelNotFoundError),
    ):
        client.predict({"text": ["a"]})
    with TranslationClient(served.address) as client:
        assert client.translate(sentences[:3]) == translators[2].translate(sentences[:3])


def test_concurrent_requests_get_their_own_answers(served, translators, sentences):
    # The greedy signature itself: translate(beam_size=1) would trace another Translator.
    greedy = translators[2].greedy(tf.constant(sentences))["translations"].numpy()
    expected = [text.decode("utf-8") for text in greedy]

    def translate(worker):
        lines = sentences[2 * worker : 2 * worker + 2]
        with TranslationClient(served.address, signature="greedy", timeout=60) as client:
            return client.translate(lines)

    with futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(translate, range(8)))
    assert [line for result in results for line in result] == expected


def test_status_of_unknown_model_is_not_found(served):
    with (
        TranslationClient(served.address, model="nope") as client,
        pytest.raises(ModelNotFoundError, match="Could not find any versions of model nope"),
    ):
        client.status()


# -- warmup ------------------------------------------------------------------------------------


def warmup_signatures(version_dir) -> list[str]:
    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    return [
        prediction_log_pb2.PredictionLog.FromString(
            record
        ).predict_log.request.model_spec.signature_name
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator()
    ]


def test_warmup_requests_run_before_the_version_is_available(
    served, exports, tmp_path, monkeypatch
):
    """A model added to models.config while the server runs: its warmup records are replayed
    while GetModelStatus still says LOADING, and only then does it say AVAILABLE.

    TF Serving: `LoaderHarness::Load` (core/loader_harness.cc) calls the servable creator of
    `SavedModelBundleSourceAdapter::GetServableCreator`
    (servables/tensorflow/saved_model_bundle_source_adapter.cc), which loads the SavedModel and
    then runs `RunSavedModelWarmup` (servables/tensorflow/saved_model_warmup_util.cc); only when
    Load returns OK does `BasicManager::ExecuteLoad` (core/basic_manager.cc) publish kAvailable,
    which `ServableStateMonitor` records and GetModelStatus reports as AVAILABLE
    (model_servers/get_model_status_impl.cc). A failed warmup request fails the load.
    """
    version_dir = tmp_path / "warmed" / "1"
    shutil.copytree(exports[1], version_dir)
    expected_signatures = warmup_signatures(version_dir)
    assert expected_signatures == ["serving_default", "greedy"]  # what serving.export writes
    client = TranslationClient(served.address, model="warmed", retries=0)

    replayed = []  # (signature, status seen over gRPC meanwhile, Predict's answer, end time)
    if served.kind == "devserver":
        from serving.devserver.servable import Servable

        replaying = threading.local()
        replay_warmup, predict = Servable.replay_warmup, Servable.predict

        def spy_replay_warmup(self, *args, **kwargs):
            replaying.active = self.name == "warmed"
            try:
                return replay_warmup(self, *args, **kwargs)
            finally:
                replaying.active = False

        def spy_predict(self, request, *args, **kwargs):
            if not getattr(replaying, "active", False):
                return predict(self, request, *args, **kwargs)
            # Asked over gRPC while this warmup request is being answered.
            states = [(v["version"], v["state"]) for v in client.status()]
            try:
                client.predict({"text": ["A dog."]}, signature="greedy")
                answer = "OK"
            except ModelNotFoundError:
                answer = "NOT_FOUND"
            response = predict(self, request, *args, **kwargs)
            replayed.append((request.model_spec.signature_name, states, answer, time.monotonic()))
            return response

        monkeypatch.setattr(Servable, "replay_warmup", spy_replay_warmup)
        monkeypatch.setattr(Servable, "predict", spy_predict)

    timeline = []  # (time, the states GetModelStatus reports), polled from this thread
    write_config(served.config_file, {**served.models, "warmed": version_dir.parent})
    deadline = time.monotonic() + 120
    while not timeline or ("AVAILABLE" not in timeline[-1][1]):
        assert time.monotonic() < deadline, f"warmed not AVAILABLE: {timeline[-3:]}"
        try:
            states = [v["state"] for v in client.status()]
        except ModelNotFoundError:
            states = []  # the new config is not read yet
        timeline.append((time.monotonic(), states))
        time.sleep(0.02)
    seen = [states for _, states in timeline]
    assert all(s in ([], ["START"], ["LOADING"], ["AVAILABLE"]) for s in seen), seen
    assert ["LOADING"] in seen  # the load (several seconds) was watched, not missed

    if served.kind == "devserver":
        assert [signature for signature, *_ in replayed] == expected_signatures
        for _, states, answer, _ in replayed:
            assert states == [(1, "LOADING")] and answer == "NOT_FOUND"
        first_available = next(t for t, states in timeline if states == ["AVAILABLE"])
        assert max(end for *_, end in replayed) < first_available
    else:
        # The real server's own log, in the order it wrote it.
        log = served.log_tail(10**7)
        warmup_path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
        markers = [
            f"Starting to read warmup data for model at {warmup_path}",
            f"Finished reading warmup data for model at {warmup_path}. Number of warmup "
            f"records read: {len(expected_signatures)}.",
            "Successfully loaded servable version {name: warmed version: 1}",
        ]
        positions = [log.find(marker) for marker in markers]
        assert -1 not in positions and positions == sorted(positions), (positions, log[-3000:])
    assert client.translate(["A dog runs."], signature="greedy")
    client.close()


# -- rollout -----------------------------------------------------------------------------------


def test_rollout_follows_operations_md(exports, translators, tmp_path, serve_models):
    """serving/OPERATIONS.md "Rolling out a new version": `specific` policy; the new version
    exported by renaming it into place, listed in one edit, labels moved in later edits once it
    is AVAILABLE; rollback by moving `stable` back; the old version removed from the config and
    its folder deleted last. Which export answers is seen in the n-best width (1: 2, 2: 4)."""
    base = tmp_path / "exports" / "transformer"
    shutil.copytree(exports[1], base / "1")
    config_file = tmp_path / "models.config"
    labels = {"stable": 1, "canary": 1}

    def edit(versions):
        write_config(
            config_file, {"transformer": base}, {"transformer": versions}, {"transformer": labels}
        )

    edit([1])
    server = serve_models(
        config_file,
        allow_version_labels_for_unavailable_models=True,  # labels at startup (OPERATIONS.md)
        file_system_poll_wait_seconds=POLL,
        model_config_file_poll_wait_seconds=POLL,
    )
    sentence = "A man in a blue shirt is standing on a ladder."

    def answer(**pin):
        """(version, n-best width) of the export the pin is served by."""
        with TranslationClient(server.address, **pin) as client:
            response = client.predict_response({"text": [sentence]}, signature="beam")
        nbest = tf.make_ndarray(response.outputs["nbest_translations"])
        return response.model_spec.version.value, nbest.shape[1]

    def states():
        with TranslationClient(server.address) as client:
            return {v["version"]: v["state"] for v in client.status()}

    v1, v2 = (1, SETTINGS.nbest), (2, WIDE.nbest)
    assert answer(label="stable") == answer(label="canary") == answer() == v1

    # 1. Export to BASE/2 by renaming a complete folder into place. `specific` lists only 1, so
    # the server leaves it alone (with `latest` it would load it and unload 1).
    shutil.copytree(exports[2], base / "2.tmp")
    os.rename(base / "2.tmp", base / "2")
    settle(server)
    assert states() == {1: "AVAILABLE"}

    # 2. First edit: list version 2; it loads (warmup first) and becomes AVAILABLE beside 1.
    edit([1, 2])
    wait_for(lambda: states() == {2: "AVAILABLE", 1: "AVAILABLE"}, what="version 2 loaded")
    assert answer() == v2  # no pin: the highest loaded version, the canary-to-be
    assert answer(label="stable") == answer(label="canary") == v1

    # 3. Second edit: move canary to 2, now that it is loaded.
    labels["canary"] = 2
    edit([1, 2])
    wait_for(lambda: answer(label="canary") == v2, what="canary on 2")
    assert answer(label="stable") == v1

    # 5. Promote, roll back (1 is still loaded: no loading), promote again.
    for version, expected in ((2, v2), (1, v1), (2, v2)):
        labels["stable"] = version
        edit([1, 2])
        wait_for(lambda e=expected: answer(label="stable") == e, what=f"stable on {version}")
        assert states() == {2: "AVAILABLE", 1: "AVAILABLE"}

    # Then remove 1 from `versions`: the server unloads it. Only then delete its folder.
    edit([2])
    wait_for(lambda: states().get(1) == "END", what="version 1 unloaded")
    with pytest.raises(ModelNotFoundError):
        answer(version=1)
    shutil.rmtree(base / "1")
    settle(server)
    assert states() == {2: "AVAILABLE", 1: "END"}
    assert answer(label="stable") == answer(label="canary") == answer() == answer(version=2) == v2
    with TranslationClient(server.address, label="stable") as client:
        assert client.translate([sentence]) == translators[2].translate([sentence])
