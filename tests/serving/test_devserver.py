"""The devserver's own options and config handling (the gRPC contract on the real export is in
test_real_export_grpc.py, the status-code table in test_parity_table.py)."""

from __future__ import annotations

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import devserver
from serving.model_config import (
    make_model_server_config,
    parse_model_server_config,
    select_versions,
)


def test_opt_in_string_length_cap_names_the_limit(fake_export, serve_models):
    # TF Serving has no such cap (test_parity_table.py: over-length-string); the devserver has
    # it only when asked, e.g. on a shared development machine. The fake model is enough: the
    # request is refused while its inputs are parsed, before any model runs.
    config = make_model_server_config({"transformer": fake_export / "transformer"})
    server = serve_models(config, prefer="devserver", max_input_bytes=2048)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "transformer"
    request.inputs["text"].CopyFrom(tf.make_tensor_proto([b"a" * 3000]))
    with grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=10)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3000-byte" in error.details() and "max_input_bytes=2048" in error.details()


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
