"""gRPC contract tests, run against tensorflow_model_server when installed, else the devserver."""

from __future__ import annotations

import os
import shutil
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from fake_model import WARMUP_TEXTS, fake_translate
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import devserver
from serving.client import ModelNotFoundError, TranslationClient
from serving.model_config import (
    make_model_server_config,
    parse_model_server_config,
    select_versions,
)


@pytest.fixture
def stub(model_server):
    with grpc.insecure_channel(model_server.address) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def make_request(model="transformer", signature="", version=None, label=None, **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value


def test_status_is_available(model_server):
    with TranslationClient(model_server.address) as client:
        assert client.status() == [
            {"version": 1, "state": "AVAILABLE", "error_code": 0, "error_message": ""}
        ]


def test_metadata_lists_the_signature_contract(model_server):
    with TranslationClient(model_server.address) as client:
        signatures = client.metadata()
    assert {"serving_default", "greedy", "beam", "greedy_ids", "beam_ids"} <= set(signatures)
    assert signatures["serving_default"] == {
        "inputs": {"text": ("string", [-1])},
        "outputs": {"translations": ("string", [-1]), "truncated": ("bool", [-1])},
    }
    assert signatures["beam"]["outputs"]["nbest_scores"] == ("float32", [-1, 2])
    assert signatures["beam_ids"]["inputs"] == {"source_ids": ("int32", [-1, -1])}


def test_predict_text_and_id_signatures(stub):
    response = stub.Predict(make_request(signature="beam", text=[b"a b c", b"x" * 50]), timeout=10)
    assert response.model_spec.name == "transformer"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "beam"
    outputs = {alias: tf.make_ndarray(proto) for alias, proto in response.outputs.items()}
    assert outputs["translations"].tolist() == [b"C B A", b"X" * 50]
    assert outputs["nbest_translations"].tolist()[0] == [b"C B A", b"c b a"]
    assert outputs["truncated"].tolist() == [False, True]
    ids = np.array([[5, 6, 0]], dtype=np.int32)
    response = stub.Predict(make_request(signature="greedy_ids", source_ids=ids), timeout=10)
    assert tf.make_ndarray(response.outputs["target_ids"]).tolist() == [[6, 7, 0]]


def test_output_filter_is_honored(stub):
    request = make_request(text=[b"a"])
    request.output_filter.append("truncated")
    assert set(stub.Predict(request, timeout=10).outputs) == {"truncated"}


def test_opt_in_string_length_cap_names_the_limit(fake_export, serve_models):
    # TF Serving has no such cap (test_parity_table.py: over-length-string); the devserver has
    # it only when asked, e.g. on a shared development machine.
    config = make_model_server_config({"transformer": fake_export / "transformer"})
    server = serve_models(config, prefer="devserver", max_input_bytes=2048)
    with grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        error = rpc_error(stub.Predict, make_request(text=[b"a" * 3000]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3000-byte" in error.details() and "max_input_bytes=2048" in error.details()


def test_server_keeps_serving_after_bad_requests(stub):
    for request in (make_request(sentence=[b"a"]), make_request(model="nope", text=[b"a"])):
        rpc_error(stub.Predict, request)
    response = stub.Predict(make_request(text=[b"still here"]), timeout=10)
    assert tf.make_ndarray(response.outputs["translations"]).tolist() == [b"HERE STILL"]


def test_concurrent_requests_get_their_own_answers(model_server):
    def translate(worker):
        with TranslationClient(model_server.address, timeout=30) as client:
            lines = [f"worker {worker} line {n}" for n in range(3)]
            return client.translate(lines) == [fake_translate(line) for line in lines]

    with futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(translate, range(8)))


def test_version_labels_pick_versions(model_server):
    def served_version(**pin):
        with TranslationClient(model_server.address, model="labelled", **pin) as client:
            return client.predict_response({"text": ["a"]}).model_spec.version.value

    assert served_version(label="stable") == 1
    assert served_version(label="canary") == 2
    assert served_version(version=1) == 1
    assert served_version() == 2  # no pin: the latest served version


def test_warmup_requests_are_replayed_before_available(model_server):
    with TranslationClient(model_server.address, model="warmed") as client:
        assert client.status()[0]["state"] == "AVAILABLE"
        counts = client.predict({"text": ["x"]}, signature="call_count")["count"]
    assert counts.tolist() == [len(WARMUP_TEXTS)]


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_new_version_is_rolled_out_and_rolled_back(fake_export, tmp_path, serve_models):
    shutil.copytree(fake_export / "transformer" / "1", tmp_path / "rollout" / "1")
    config = make_model_server_config({"rollout": tmp_path / "rollout"})
    server = serve_models(config, file_system_poll_wait_seconds=0.2)
    client = TranslationClient(server.address, model="rollout")

    def states():
        return {entry["version"]: entry["state"] for entry in client.status()}

    # Copy under a non-numeric name, then rename: the server never sees a half-written version.
    shutil.copytree(fake_export / "transformer" / "1", tmp_path / "rollout" / "2.partial")
    os.rename(tmp_path / "rollout" / "2.partial", tmp_path / "rollout" / "2")
    wait_for(lambda: states() == {1: "END", 2: "AVAILABLE"})
    assert client.predict_response({"text": ["a"]}).model_spec.version.value == 2

    shutil.rmtree(tmp_path / "rollout" / "2")
    wait_for(lambda: states().get(1) == "AVAILABLE")
    assert client.predict_response({"text": ["a"]}).model_spec.version.value == 1
    client.close()


def test_status_of_unknown_model_is_not_found(model_server):
    client = TranslationClient(model_server.address, model="nope")
    with pytest.raises(ModelNotFoundError, match="Could not find any versions of model nope"):
        client.status()
    client.close()


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("", [7]),
        ("model_version_policy { latest { num_versions: 2 } }", [3, 7]),
        ("model_version_policy { all {} }", [1, 3, 7]),
        ("model_version_policy { specific { versions: 1 versions: 5 } }", [1]),
    ],
)
def test_version_policies_select_like_tf_serving(policy, expected):
    config = parse_model_server_config(
        f'model_config_list {{ config {{ name: "m" base_path: "/m" {policy} }} }}'
    )
    assert select_versions(config.model_config_list.config[0], [3, 1, 7]) == expected


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="models.config is not a valid"):
        parse_model_server_config("model_config_list { bogus: 1 }", source="models.config")
    with pytest.raises(ValueError, match="'m' has no base_path"):
        parse_model_server_config('model_config_list { config { name: "m" } }')
    config = make_model_server_config({"absent": tmp_path / "absent"})
    with pytest.raises(RuntimeError, match="absent.*no version folders found"):
        devserver.start_server(config)


def test_devserver_help_says_it_is_not_for_production(capsys):
    with pytest.raises(SystemExit) as info:
        devserver.main(["--help"])
    assert info.value.code == 0
    assert "NOT a production server" in " ".join(capsys.readouterr().out.split())
