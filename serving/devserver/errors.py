"""The error a request fails with, carrying the gRPC status code TF Serving would answer with."""

from __future__ import annotations

import grpc
import tensorflow as tf

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request failure carrying the gRPC status code TF Serving would answer with.

    Args:
        code: The status the client receives.
        message: The status details the client receives.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ConfigRefusedError(ServingError, ValueError):
    """A model server config that TF Serving's `ServerCore::ReloadConfig` refuses.

    A `ValueError` (the config is bad) that also carries the status TF Serving answers
    `ModelService.HandleReloadConfigRequest` with; at startup the server does not start.
    """


def error_from_op_error(error: tf.errors.OpError) -> ServingError:
    """A failure inside a signature, with the status code of its TensorFlow error.

    TF Serving returns the session's status unchanged, and TensorFlow's error codes are gRPC's.
    """
    return ServingError(_CODES.get(error.error_code, grpc.StatusCode.UNKNOWN), error.message)


def servable_not_found(name: str, version: int | None) -> ServingError:
    """NOT_FOUND for a model or version that is not loaded.

    The wording is TF Serving's (`BasicManager::GetUntypedServableHandle` in
    tensorflow_serving/core/basic_manager.cc, with `ServableRequest::DebugString`), which clients
    may match.
    """
    request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
    return ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")
