"""Behaviour parity with TF Serving, as one table per kind of input.

Each row is (what is sent or configured, the gRPC status code TF Serving answers with, a
fragment of its message) and cites the TF Serving source (tensorflow/serving; TensorFlow's, for
the messages TF Serving passes on from it) the expectation is read from. The rows run against
`tensorflow_model_server` when it is on PATH and against the devserver otherwise
(model_server.py; SERVING_TEST_SERVER forces one), so the devserver is held to what the real
server does, not to what it did before.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
from model_server import MAX_BATCH_SIZE, ServerStartError, start_model_server
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.devserver.errors import ConfigRefusedError
from serving.model_config import ModelServerConfig, make_model_server_config

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

SERVER_CORE = "tensorflow_serving/model_servers/server_core.cc"
NOT_FOUND_SOURCE = (
    "tensorflow_serving/core/basic_manager.cc BasicManager::GetUntypedServableHandle "
    "(ServableRequest::DebugString: Latest(name) / Specific(name, version))"
)


def predict(model="transformer", signature="", version=None, label=None, spec=True, **inputs):
    request = predict_pb2.PredictRequest()
    if spec:
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        if label is not None:
            request.model_spec.version_label = label
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


def metadata(model="transformer", fields=("signature_def",)):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
    request.model_spec.name = model
    return request


def status(model="transformer", version=None, label=None, spec=True):
    request = get_model_status_pb2.GetModelStatusRequest()
    if spec:
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        if label is not None:
            request.model_spec.version_label = label
    return request


def versions_newest_first(*versions):
    def check(response):
        assert [(s.version, s.state) for s in response.model_version_status] == [
            (v, get_model_status_pb2.ModelVersionStatus.AVAILABLE) for v in versions
        ]

    return check


def served_version(version):
    def check(response):
        assert response.model_spec.version.value == version

    return check


def output_equals(alias, values):
    def check(response):
        assert tf.make_ndarray(response.outputs[alias]).tolist() == values

    return check


@dataclasses.dataclass(frozen=True)
class Row:
    """One request and TF Serving's answer to it.

    Attributes:
        rpc: "Predict", "GetModelMetadata" or "GetModelStatus".
        request: The request proto.
        code: The status TF Serving answers with.
        fragment: Part of TF Serving's message ("" for OK).
        source: Where in TF Serving's source the answer comes from.
        check: For OK rows, a check of the response.
    """

    rpc: str
    request: object
    code: grpc.StatusCode
    fragment: str
    source: str
    check: Callable | None = None


# Against the session's `model_server` (conftest.py): transformer/1, and labelled/1 and /2 under
# a `specific` policy for versions 1, 2, 3, labelled stable: 1, canary: 2, next: 3 (never
# exported), started with --allow_version_labels_for_unavailable_models.
REQUEST_ROWS = {
    "unknown-model": Row(
        "Predict",
        predict("nope", text=[b"a"]),
        NOT_FOUND,
        "Servable not found for request: Latest(nope)",
        NOT_FOUND_SOURCE,
    ),
    "unknown-version": Row(
        "Predict",
        predict(version=7, text=[b"a"]),
        NOT_FOUND,
        "Servable not found for request: Specific(transformer, 7)",
        NOT_FOUND_SOURCE,
    ),
    "unknown-label": Row(
        "Predict",
        predict("labelled", label="nightly", text=[b"a"]),
        INVALID_ARGUMENT,
        "Unrecognized servable version label: nightly",
        f"{SERVER_CORE} ServerCore::GetModelVersionForLabel",
    ),
    "label-picks-its-version": Row(
        "Predict",
        predict("labelled", label="canary", text=[b"a"]),
        OK,
        "",
        f"{SERVER_CORE} ServerCore::ServableRequestFromModelSpec (kVersionLabel -> Specific)",
        served_version(2),
    ),
    "label-of-version-not-loaded": Row(
        "Predict",
        predict("labelled", label="next", text=[b"a"]),
        NOT_FOUND,
        "Servable not found for request: Specific(labelled, 3)",
        f"{SERVER_CORE} ServerCore::ServableRequestFromModelSpec, then {NOT_FOUND_SOURCE}",
    ),
    "unknown-signature": Row(
        "Predict",
        predict(signature="sampling", text=[b"a"]),
        FAILED_PRECONDITION,
        'Serving signature key "sampling" not found.',
        "tensorflow_serving/servables/tensorflow/predict_util.cc internal::RunPredict",
    ),
    "empty-model-name": Row(
        "Predict",
        predict("", text=[b"a"]),
        INVALID_ARGUMENT,
        "ModelSpec has no name specified.",
        f"{SERVER_CORE} ServerCore::ServableRequestFromModelSpec",
    ),
    "missing-model-spec": Row(
        "Predict",
        predict(spec=False, text=[b"a"]),
        INVALID_ARGUMENT,
        "Missing ModelSpec",
        "tensorflow_serving/servables/tensorflow/predict_impl.cc TensorflowPredictor::Predict",
    ),
    "bad-input-name": Row(
        "Predict",
        predict(sentence=[b"a"]),
        INVALID_ARGUMENT,
        "input tensor alias not found in signature: sentence",
        "predict_util.cc PreProcessPrediction -> TensorFlow "
        "tensorflow/cc/saved_model/util.cc GetInputValues",
    ),
    "extra-input": Row(
        "Predict",
        predict(text=[b"a"], sentence=[b"a"]),
        INVALID_ARGUMENT,
        "input size does not match signature: 2!=1",
        "tensorflow_serving/servables/tensorflow/predict_util.cc VerifyRequestInputsSize",
    ),
    "no-inputs": Row(
        "Predict",
        predict(),
        INVALID_ARGUMENT,
        "input size does not match signature: 0!=1",
        "tensorflow_serving/servables/tensorflow/predict_util.cc VerifyRequestInputsSize",
    ),
    "bad-dtype": Row(
        "Predict",
        predict(text=np.array([1, 2], dtype=np.int32)),
        INVALID_ARGUMENT,
        "to be string but int32 is provided",
        "predict_util.cc internal::RunPredict -> Session::Run -> TensorFlow "
        "core/framework/function.cc FunctionCallFrame::SetArgs",
    ),
    "bad-shape-scalar": Row(
        "Predict",
        predict(text=np.array(b"a", dtype=object)),
        INVALID_ARGUMENT,
        "Batching Run() input tensors must have at least one dimension",
        "tensorflow_serving/batching/batching_util.h ComputeTensorBatchSize, from "
        "batching_session.cc BatchingSession::ComputeInputSize (--enable_batching)",
    ),
    "over-cap-batch": Row(
        "Predict",
        predict(text=[b"a"] * (MAX_BATCH_SIZE + 1)),
        INVALID_ARGUMENT,
        f"Task size {MAX_BATCH_SIZE + 1} is larger than maximum input batch size {MAX_BATCH_SIZE}",
        "max_batch_size of serving/batching_parameters.txt as input_batch_size_limit "
        "(servables/tensorflow/bundle_factory_util.h GetQueueOptions) -> TensorFlow "
        "core/kernels/batching_util/shared_batch_scheduler.h "
        "Queue::ValidateBatchTaskQueueCapacity",
    ),
    # TF Serving has no length cap (predict_util.cc checks aliases only; server.cc
    # Server::BuildAndStart allows 2 GiB messages): a long sentence is the export's to handle,
    # which truncates it (`truncated`; the fake model marks more than 40 bytes).
    "over-length-string": Row(
        "Predict",
        predict(text=[b"x " * 1500]),
        OK,
        "",
        "no cap: predict_util.cc PreProcessPrediction; server.cc SetMaxMessageSize(INT32_MAX)",
        output_equals("truncated", [True]),
    ),
    "unknown-output-filter": Row(
        "Predict",
        predict(text=[b"a"]),
        INVALID_ARGUMENT,
        "output tensor alias not found in signature: nope",
        "tensorflow_serving/servables/tensorflow/predict_util.cc PreProcessPrediction",
    ),
    "metadata-empty-model-name": Row(
        "GetModelMetadata",
        metadata(""),
        INVALID_ARGUMENT,
        "ModelSpec has no name specified.",
        f"{SERVER_CORE} ServerCore::ServableRequestFromModelSpec",
    ),
    "metadata-fields-checked-before-model": Row(
        "GetModelMetadata",
        metadata("nope", fields=()),
        INVALID_ARGUMENT,
        "GetModelMetadataRequest must specify at least one metadata_field",
        "tensorflow_serving/servables/tensorflow/get_model_metadata_impl.cc "
        "ValidateGetModelMetadataRequest, before SavedModelGetSignatureDef looks up the model",
    ),
    "status-ignores-label": Row(
        "GetModelStatus",
        status("labelled", label="stable"),
        OK,
        "",
        "tensorflow_serving/model_servers/get_model_status_impl.cc "
        "GetModelStatusWithModelSpec (only has_version() narrows; VersionMap is std::greater)",
        versions_newest_first(2, 1),
    ),
    "status-ignores-unknown-label": Row(
        "GetModelStatus",
        status("labelled", label="nightly"),
        OK,
        "",
        "get_model_status_impl.cc GetModelStatusWithModelSpec",
        versions_newest_first(2, 1),
    ),
    "status-unknown-version": Row(
        "GetModelStatus",
        status(version=7),
        NOT_FOUND,
        "Could not find version 7 of model transformer",
        "get_model_status_impl.cc GetModelStatusWithModelSpec",
    ),
    # GetModelStatus does not check the name, so "" is an unknown model there.
    "status-empty-model-name": Row(
        "GetModelStatus",
        status(""),
        NOT_FOUND,
        "Could not find any versions of model ",
        "get_model_status_impl.cc GetModelStatusWithModelSpec",
    ),
    "status-missing-model-spec": Row(
        "GetModelStatus",
        status(spec=False),
        INVALID_ARGUMENT,
        "Missing ModelSpec",
        "get_model_status_impl.cc GetModelStatusImpl::GetModelStatus",
    ),
}
REQUEST_ROWS["unknown-output-filter"].request.output_filter.append("nope")


def call(address, rpc, request):
    """Sends one request; returns (status code, details, response or None)."""
    with grpc.insecure_channel(address) as channel:
        if rpc == "GetModelStatus":
            method = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus
        else:
            method = getattr(prediction_service_pb2_grpc.PredictionServiceStub(channel), rpc)
        try:
            return OK, "", method(request, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details() or "", None


@pytest.mark.parametrize("row_id", list(REQUEST_ROWS))
def test_request_answered_as_tf_serving(model_server, row_id):
    row = REQUEST_ROWS[row_id]
    code, details, response = call(model_server.address, row.rpc, row.request)
    assert (code, row.fragment in details) == (row.code, True), (
        f"{model_server.kind} answered {code.name} {details!r}; TF Serving answers "
        f"{row.code.name} {row.fragment!r} ({row.source})"
    )
    if row.check is not None:
        row.check(response)


@dataclasses.dataclass(frozen=True)
class ConfigRow:
    """A server started on one config, then optionally reloaded with another.

    Both configs serve model "labelled" under a `specific` policy; versions 1, 2 and 3 are
    exported, the startup config serves 1 and 2.

    Attributes:
        labels: `version_labels` of the startup config.
        allow: Whether the server runs with --allow_version_labels_for_unavailable_models.
        reload: None, or (versions, labels) sent with ModelService.HandleReloadConfigRequest;
            versions "relative" sends a relative base_path instead.
        code: The status of the startup (when `reload` is None) or of the reload.
        fragment: Part of TF Serving's message.
        source: Where in TF Serving's source the answer comes from.
        labels_after: Label -> the version a Predict with that label is answered by, after.
    """

    labels: dict
    allow: bool
    reload: tuple | None
    code: grpc.StatusCode
    fragment: str
    source: str
    labels_after: dict = dataclasses.field(default_factory=dict)


REFUSED = (
    "Request to assign label to version {} of model labelled, which is not currently available"
)
LABEL_CHECK = (
    f"{SERVER_CORE} ServerCore::ReloadConfig calls UpdateModelVersionLabelMap before "
    "AddModelsViaModelConfigList (nothing is loaded at startup)"
)
CONFIG_ROWS = {
    "startup-labels-without-flag": ConfigRow(
        {"stable": 1}, False, None, FAILED_PRECONDITION, REFUSED.format(1), LABEL_CHECK
    ),
    "startup-labels-with-flag": ConfigRow(
        {"stable": 1, "canary": 2},
        True,
        None,
        OK,
        "",
        f"{SERVER_CORE} UpdateModelVersionLabelMap: a new label may name any version "
        "with allow_version_labels_for_unavailable_models",
        {"stable": 1, "canary": 2},
    ),
    "move-label-to-version-not-loaded-with-flag": ConfigRow(
        {"stable": 1, "canary": 2},
        True,
        ([1, 2, 3], {"stable": 1, "canary": 3}),
        FAILED_PRECONDITION,
        REFUSED.format(3),
        f"{SERVER_CORE} UpdateModelVersionLabelMap: contains_existing_label_with_"
        "different_version overrides the flag; checked before version 3 (on disk) loads, and "
        "the refused config changes nothing",
        {"stable": 1, "canary": 2},
    ),
    "move-label-to-loaded-version": ConfigRow(
        {"stable": 1, "canary": 2},
        True,
        ([1, 2], {"stable": 2, "canary": 2}),
        OK,
        "",
        f"{SERVER_CORE} UpdateModelVersionLabelMap (the version is kAvailable)",
        {"stable": 2, "canary": 2},
    ),
    "new-label-to-version-not-loaded-with-flag": ConfigRow(
        {"stable": 1},
        True,
        ([1, 2], {"stable": 1, "next": 5}),
        OK,
        "",
        f"{SERVER_CORE} UpdateModelVersionLabelMap (no existing label 'next')",
        {"stable": 1},
    ),
    "new-label-to-version-not-loaded-without-flag": ConfigRow(
        {}, False, ([1, 2], {"next": 5}), FAILED_PRECONDITION, REFUSED.format(5), LABEL_CHECK
    ),
    "label-on-loaded-version-without-flag": ConfigRow(
        {},
        False,
        ([1, 2], {"stable": 1}),
        OK,
        "",
        f"{SERVER_CORE} UpdateModelVersionLabelMap (after startup, version 1 is kAvailable)",
        {"stable": 1},
    ),
    "relative-base-path": ConfigRow(
        {},
        False,
        ("relative", {}),
        INVALID_ARGUMENT,
        "to have an absolute path or URI; got base_path()=labelled",
        f"{SERVER_CORE} ValidateModelConfigList",
    ),
}


def labelled_config(base, versions, labels) -> ModelServerConfig:
    config = make_model_server_config(
        {"labelled": base}, versions={"labelled": versions}, labels={"labelled": labels}
    )
    return config


def start_status(config, allow):
    """Starts a server; returns (server or None, status code, message)."""
    try:
        server = start_model_server(config, allow_version_labels_for_unavailable_models=allow)
    except ConfigRefusedError as error:  # the devserver
        return None, error.code, error.message
    except ServerStartError as error:  # tensorflow_model_server exited
        return None, error.code, error.details
    return server, OK, ""


def reload_status(address, config):
    request = model_management_pb2.ReloadConfigRequest(config=config)
    with grpc.insecure_channel(address) as channel:
        try:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                request, timeout=60
            )
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
    return OK, ""


@pytest.fixture(scope="module")
def three_versions(fake_export, tmp_path_factory):
    """labelled/1, /2 and /3: version 3 is on disk, so only the label check keeps a config
    that adds it and labels it in one edit from being served."""
    base = tmp_path_factory.mktemp("parity") / "labelled"
    shutil.copytree(fake_export / "labelled", base)
    shutil.copytree(base / "1", base / "3")
    return base


@pytest.mark.parametrize("row_id", list(CONFIG_ROWS))
def test_config_handled_as_tf_serving(three_versions, row_id):
    row = CONFIG_ROWS[row_id]
    base = three_versions
    server, code, details = start_status(labelled_config(base, [1, 2], row.labels), row.allow)
    try:
        if row.reload is not None:
            assert server is not None, f"startup refused: {code.name} {details}"
            versions, labels = row.reload
            if versions == "relative":
                config = labelled_config(base, [1, 2], labels)
                config.model_config_list.config[0].base_path = "labelled"
            else:
                config = labelled_config(base, versions, labels)
            code, details = reload_status(server.address, config)
        assert (code, row.fragment in details) == (row.code, True), (
            f"answered {code.name} {details!r}; TF Serving answers {row.code.name} "
            f"{row.fragment!r} ({row.source})"
        )
        for label, version in row.labels_after.items():
            _, details, response = call(
                server.address, "Predict", predict("labelled", label=label, text=[b"a"])
            )
            assert response is not None, f"label {label}: {details}"
            assert response.model_spec.version.value == version, label
    finally:
        if server is not None:
            server.stop()
