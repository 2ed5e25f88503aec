"""One loaded SavedModel version: its signatures as TF Serving reads them, Predict, and the
replay of its warmup requests.
"""

from __future__ import annotations

import functools
import os

import grpc
import numpy as np
import tensorflow as tf

# tensorflow_model_server links the tensorflow-text ops; registering them here lets the
# devserver load the same exports (their tokenizer is a SentencePiece op in the graph).
import tensorflow_text  # noqa: F401
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from serving.devserver.batching import BatchScheduler
from serving.devserver.errors import ServingError, error_from_op_error
from serving.devserver.requests import (
    DEFAULT_SIGNATURE,
    Limits,
    check_output_filter,
    parse_inputs,
)

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# TF Serving refuses warmup files with more records than this (`WarmupConsts::kMaxNumRecords`,
# tensorflow_serving/servables/tensorflow/saved_model_warmup_util.cc).
MAX_WARMUP_RECORDS = 1000


def _run_signature(function, inputs: dict) -> dict[str, np.ndarray]:
    """Calls a signature function; alias to numpy array, TensorFlow errors as ServingError."""
    specs = function.structured_input_signature[1]
    try:
        results = function(
            **{alias: tf.constant(v, specs[alias].dtype) for alias, v in inputs.items()}
        )
    except tf.errors.OpError as error:
        raise error_from_op_error(error) from None
    return {alias: value.numpy() for alias, value in results.items()}


class Servable:
    """One loaded version of one model.

    Args:
        name: The model's name.
        version: The version number (the folder's name).
        path: The version folder, holding `saved_model.pb`.
        xla_cpu_compilation_enabled: As TF Serving's flag. Without it a model whose graph has
            functions marked for XLA (`tf.function(jit_compile=True)`, an export made with
            `--jit-compile`) loads, but running it fails with INTERNAL "XLA compilation
            disabled": `main.cc` of tensorflow_serving/model_servers calls
            `tensorflow::DisableXlaCompilation()` unless the flag is set, and the XLA device
            compiler then returns `errors::Internal("XLA compilation disabled")` for the first
            compilation (tensorflow/compiler/jit/device_compiler.h). With a warmup file that
            failure happens during warmup, so the version does not become AVAILABLE.
    """

    def __init__(self, name: str, version: int, path: str, xla_cpu_compilation_enabled=False):
        self.name = name
        self.version = version
        self.path = path
        self._loaded = tf.saved_model.load(path)
        self.functions = dict(self._loaded.signatures)
        # The SignatureDefs are read from disk, as TF Serving does, so metadata is identical.
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as file:
            saved_model.ParseFromString(file.read())
        self.signature_defs = saved_model.meta_graphs[0].signature_def
        self.xla_functions = [
            function.signature.name
            for function in saved_model.meta_graphs[0].graph_def.library.function
            if function.attr["_XlaMustCompile"].b
        ]
        self.xla_disabled = bool(self.xla_functions) and not xla_cpu_compilation_enabled

    def predict(
        self,
        request: predict_pb2.PredictRequest,
        limits: Limits,
        batching: BatchScheduler | None = None,
        timeout: float | None = None,
    ) -> predict_pb2.PredictResponse:
        """Runs one PredictRequest against this version, validating it as TF Serving does.

        Args:
            request: The request.
            limits: The devserver's per-request caps.
            batching: With `--enable_batching`, the scheduler that merges concurrent requests
                to the same signature; None runs the request on its own.
            timeout: Seconds left before the client's deadline (None: no deadline); with
                batching, a request still queued after it is not run, as in TF Serving.

        Raises:
            ServingError: With the status code TF Serving would answer with.
        """
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        function = self.functions.get(signature_name)
        if function is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        inputs = parse_inputs(request.inputs, function.structured_input_signature[1], limits)
        outputs = check_output_filter(
            request.output_filter, self.signature_defs[signature_name].outputs
        )
        if self.xla_disabled:
            # Every signature of our exports reaches the compiled search (TF Serving would
            # answer a zero-row request, which skips the search; that case is not modelled).
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                "XLA compilation disabled (this model has functions compiled by XLA, "
                f"e.g. {self.xla_functions[0]}: start the server with "
                "--xla_cpu_compilation_enabled=true)",
            )
        if batching is None:
            results = _run_signature(function, inputs)
        else:
            # TF Serving batches every signature of a version, each output set in a queue of its
            # own (saved_model_bundle_factory.cc, batching_session.cc).
            queue = batching.queue(
                self,
                (signature_name, tuple(outputs)),
                functools.partial(_run_signature, function),
                tuple(outputs),
                f"{self.name}/{self.version}/{signature_name}",
            )
            arrays = {alias: tensor.numpy() for alias, tensor in inputs.items()}
            results = queue.run(arrays, timeout)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature_name
        for alias in outputs:
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(results[alias]))
        return response

    def replay_warmup(self, limits: Limits) -> int:
        """Replays `assets.extra/tf_serving_warmup_requests`, as TF Serving does before it marks
        a version AVAILABLE.

        Returns:
            The number of requests replayed (0 without a warmup file).

        Raises:
            ValueError: If the file has too many records or one that is not a predict_log.
            ServingError: If a warmup request fails; the version must then not be served.
        """
        path = os.path.join(self.path, WARMUP_FILE)
        if not os.path.exists(path):
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise ValueError(
                    f"{path} has more than {MAX_WARMUP_RECORDS} records, TF Serving's maximum"
                )
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                raise ValueError(
                    f"{path} record {count} is a {log.WhichOneof('log_type')}; the devserver "
                    "replays only predict_log records"
                )
            self.predict(log.predict_log.request, limits)
        return count
