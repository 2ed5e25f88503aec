"""TF Serving's gRPC services (PredictionService.Predict/GetModelMetadata and
ModelService.GetModelStatus/HandleReloadConfigRequest) answered from a `ModelRegistry`, with
failures turned into the status codes TF Serving answers with.
"""

from __future__ import annotations

import functools
import logging

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving import model_config as model_config_lib
from serving.devserver.errors import ServingError
from serving.devserver.registry import ModelRegistry

logger = logging.getLogger(__name__)


def _serving_call(method):
    """Turns ServingError and unexpected exceptions into gRPC statuses for one RPC method."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as error:
            context.abort(error.code, error.message)
        except Exception as error:  # the server must outlive any bad request
            logger.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    return wrapper


class ServingServicer(
    prediction_service_pb2_grpc.PredictionServiceServicer,
    model_service_pb2_grpc.ModelServiceServicer,
):
    """Both services over one registry; register it with `add_to_server`.

    Args:
        registry: The loaded models.
        batching: With `--enable_batching`, the `batching.BatchScheduler` Predict goes through.
    """

    def __init__(self, registry: ModelRegistry, batching=None):
        self._registry = registry
        self._batching = batching

    def add_to_server(self, server: grpc.Server) -> None:
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self, server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self, server)

    @staticmethod
    def _require_model_spec(request) -> None:
        # TensorflowPredictor::Predict (servables/tensorflow/predict_impl.cc),
        # GetModelMetadataImpl::GetModelMetadata and GetModelStatusImpl::GetModelStatus.
        if not request.HasField("model_spec"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")

    @_serving_call
    def Predict(self, request, context):
        self._require_model_spec(request)
        servable = self._registry.resolve(request.model_spec)
        return servable.predict(
            request, self._registry.limits, self._batching, context.time_remaining()
        )

    @_serving_call
    def GetModelMetadata(self, request, context):
        # As tensorflow_serving/servables/tensorflow/get_model_metadata_impl.cc: the fields are
        # validated before the model is looked up; only "signature_def" exists.
        self._require_model_spec(request)
        if not request.metadata_field:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "GetModelMetadataRequest must specify at least one metadata_field",
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported"
                )
        servable = self._registry.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    @_serving_call
    def GetModelStatus(self, request, context):
        self._require_model_spec(request)
        response = get_model_status_pb2.GetModelStatusResponse()
        response.model_version_status.extend(self._registry.statuses(request.model_spec))
        return response

    @_serving_call
    def HandleReloadConfigRequest(self, request, context):
        # ModelServiceImpl::HandleReloadConfigRequest (model_servers/model_service_impl.cc):
        # ServerCore::ReloadConfig's status is the RPC's status.
        if request.config.WhichOneof("config") != "model_config_list":
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                "ModelConfigList is currently supported",
            )
        config = model_config_lib.ModelServerConfig()
        config.CopyFrom(request.config)
        try:
            model_config_lib.check_model_server_config(config, source="ReloadConfigRequest")
        except ValueError as error:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        # A refused config raises ConfigRefusedError, a ServingError with TF Serving's code.
        self._registry.reload_config(config)
        return model_management_pb2.ReloadConfigResponse()
