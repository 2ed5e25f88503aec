"""Development stand-in for TF Serving: serves a models.config over TF Serving's gRPC API.

Not a production server (no server-side batching, REST or metrics); use `tensorflow_model_server`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf

# tensorflow_model_server links the tensorflow-text ops; registering them here lets the
# devserver load the same exports (their tokenizer is a SentencePiece op in the graph).
import tensorflow_text  # noqa: F401
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from serving import model_config as model_config_lib

logger = logging.getLogger("serving.devserver")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# TF Serving refuses warmup files with more records than this.
MAX_WARMUP_RECORDS = 1000
DEFAULT_SIGNATURE = "serving_default"
State = get_model_status_pb2.ModelVersionStatus.State
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request failure carrying the gRPC status code TF Serving would answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request caps, so that one request cannot exhaust a development machine.

    Attributes:
        max_batch_size: Most rows (size of dimension 0) an input may have.
        max_input_bytes: Most bytes one string element may have; for numeric inputs, the most
            elements per row (e.g. token ids per sentence).
    """

    max_batch_size: int = 64
    max_input_bytes: int = 2048


def _servable_request(name: str, version: int | None) -> str:
    # The exact wording of TF Serving's ServableRequest::DebugString, which clients may match.
    return f"Specific({name}, {version})" if version is not None else f"Latest({name})"


def _check_output_filter(output_filter, outputs) -> list[str]:
    seen = []
    for alias in output_filter:
        if alias not in outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {{{','.join(sorted(outputs))}}}.",
            )
        if alias in seen:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}"
            )
        seen.append(alias)
    return seen or sorted(outputs)


class Servable:
    """One loaded version of one model."""

    def __init__(self, name: str, version: int, path: str):
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

    def predict(
        self, request: predict_pb2.PredictRequest, limits: Limits
    ) -> predict_pb2.PredictResponse:
        """Runs one PredictRequest against this version, validating it as TF Serving does."""
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        function = self.functions.get(signature_name)
        if function is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        specs = function.structured_input_signature[1]
        inputs = self._parse_inputs(request, specs, limits)
        outputs = _check_output_filter(
            request.output_filter, self.signature_defs[signature_name].outputs
        )
        try:
            results = function(**inputs)
        except tf.errors.OpError as error:
            code = _CODES.get(error.error_code, grpc.StatusCode.UNKNOWN)
            raise ServingError(code, error.message) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature_name
        for alias in outputs:
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(results[alias].numpy()))
        return response

    def _parse_inputs(self, request, specs, limits) -> dict[str, tf.Tensor]:
        sent, expected = set(request.inputs), set(specs)
        if len(sent) != len(expected):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
            )
        tensors = {}
        for alias, proto in request.inputs.items():
            spec = specs.get(alias)
            if spec is None:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input tensor alias not found in signature: {alias}. Inputs expected to be "
                    f"in the set {{{','.join(sorted(expected))}}}.",
                )
            if proto.dtype != spec.dtype.as_datatype_enum:
                got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "no dtype"
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f'Expects input "{alias}" to be {spec.dtype.name} but {got} is provided',
                )
            try:
                array = tf.make_ndarray(proto)
            except Exception as error:  # a malformed proto may fail in many ways
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {alias}: {error}"
                ) from None
            if not spec.shape.is_compatible_with(array.shape):
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f'input "{alias}" has shape {list(array.shape)}, which does not match the '
                    f"signature's shape {_shape_text(spec.shape)}",
                )
            _check_limits(alias, array, limits)
            tensors[alias] = tf.constant(array, dtype=spec.dtype)
        return tensors


def _shape_text(shape: tf.TensorShape) -> str:
    return "unknown" if shape.rank is None else str(shape.as_list())


def _check_limits(alias: str, array: np.ndarray, limits: Limits) -> None:
    if array.ndim >= 1 and array.shape[0] > limits.max_batch_size:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'input "{alias}" has batch size {array.shape[0]}, over the devserver limit '
            f"max_batch_size={limits.max_batch_size}; send smaller batches",
        )
    if array.dtype == object:
        longest = max((len(value) for value in array.flat), default=0)
        if longest > limits.max_input_bytes:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'input "{alias}" has a {longest}-byte string, over the devserver limit '
                f"max_input_bytes={limits.max_input_bytes}",
            )
    elif array.ndim >= 2 and array.size // max(array.shape[0], 1) > limits.max_input_bytes:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'input "{alias}" has {array.size // array.shape[0]} elements per row, over the '
            f"devserver limit max_input_bytes={limits.max_input_bytes}",
        )


@dataclasses.dataclass
class _VersionStatus:
    state: int
    error_code: int = 0
    error_message: str = ""


class ModelRegistry:
    """Loads the versions a ModelServerConfig asks for and resolves requests to them.

    Args:
        config: The models to serve.
        limits: Per-request caps; `Limits()` when None.
        allow_version_labels_for_unavailable_models: As TF Serving's flag of that name: allow
            labels that point at versions that are not loaded (requests for them get NOT_FOUND).
    """

    def __init__(
        self,
        config: model_config_lib.ModelServerConfig,
        limits: Limits | None = None,
        allow_version_labels_for_unavailable_models: bool = False,
    ):
        self.limits = limits or Limits()
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._config = config
        self._lock = threading.Lock()  # guards the maps below; never held while loading
        self._sync_lock = threading.Lock()  # one sync at a time
        self._servables: dict[str, dict[int, Servable]] = {}
        self._statuses: dict[str, dict[int, _VersionStatus]] = {}
        self._labels: dict[str, dict[str, int]] = {}

    @property
    def config(self) -> model_config_lib.ModelServerConfig:
        return self._config

    def sync(self, config: model_config_lib.ModelServerConfig | None = None) -> None:
        """Loads new aspired versions, unloads dropped ones and applies labels.

        Args:
            config: A new config to switch to; None re-scans the version folders only.

        Raises:
            ValueError: If a label points at a version that is not available and
                `allow_version_labels_for_unavailable_models` is off; labels are left unchanged.
        """
        with self._sync_lock:
            config = config if config is not None else self._config
            models = {model.name: model for model in config.model_config_list.config}
            for name in set(self._servables) - set(models):
                self._unload(name, list(self._servables[name]))
            for model in models.values():
                self._sync_model(model)
            labels = self._check_labels(models.values())
            with self._lock:
                self._labels = labels
                self._config = config

    def _sync_model(self, model: model_config_lib.ModelConfig) -> None:
        try:
            on_disk = model_config_lib.list_versions(model.base_path)
        except FileNotFoundError as error:
            logger.warning("model %s: %s; will look again at the next poll", model.name, error)
            on_disk = []
        aspired = model_config_lib.select_versions(model, on_disk)
        loaded = self._servables.get(model.name, {})
        statuses = self._statuses.get(model.name, {})
        for version in aspired:
            # A version that failed to load is not retried (TF Serving gives up after a few
            # retries too); one unloaded cleanly is reloaded, which is what a rollback needs.
            failed = version in statuses and statuses[version].error_code != 0
            if version not in loaded and not failed:
                self._load(model.name, version, os.path.join(model.base_path, str(version)))
        self._unload(model.name, [version for version in loaded if version not in aspired])

    def _load(self, name: str, version: int, path: str) -> None:
        with self._lock:
            self._statuses.setdefault(name, {})[version] = _VersionStatus(State.LOADING)
        logger.info("loading %s version %d from %s", name, version, path)
        try:
            servable = Servable(name, version, path)
            count = self._warm_up(servable)
        except Exception as error:  # any failure must leave the server running
            code = error.code if isinstance(error, ServingError) else grpc.StatusCode.UNKNOWN
            message = f"loading {name} version {version} from {path} failed: {error}"
            logger.error("%s", message)
            with self._lock:
                self._statuses[name][version] = _VersionStatus(State.END, code.value[0], message)
            return
        with self._lock:
            self._servables.setdefault(name, {})[version] = servable
            self._statuses[name][version] = _VersionStatus(State.AVAILABLE)
        logger.info("%s version %d AVAILABLE (%d warmup requests replayed)", name, version, count)

    def _unload(self, name: str, versions: list[int]) -> None:
        with self._lock:
            for version in versions:
                # In-flight requests keep their reference; the version is freed when they end.
                self._servables[name].pop(version, None)
                self._statuses[name][version] = _VersionStatus(State.END)
                logger.info("unloaded %s version %d", name, version)

    def _warm_up(self, servable: Servable) -> int:
        path = os.path.join(servable.path, WARMUP_FILE)
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
            servable.predict(log.predict_log.request, self.limits)
        return count

    def _check_labels(self, models) -> dict[str, dict[str, int]]:
        labels = {}
        for model in models:
            available = self._servables.get(model.name, {})
            for label, version in model.version_labels.items():
                if version not in available and not self.allow_unavailable_labels:
                    raise ValueError(
                        f"version label {label!r} of model {model.name!r} points at version "
                        f"{version}, which is not available (loaded: {sorted(available)}); "
                        "load it first or pass --allow_version_labels_for_unavailable_models"
                    )
            labels[model.name] = dict(model.version_labels)
        return labels

    def _version_for(self, model_spec) -> int | None:
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            return model_spec.version.value
        if choice == "version_label":
            version = self._labels.get(model_spec.name, {}).get(model_spec.version_label)
            if version is None:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {model_spec.version_label}",
                )
            return version
        return None

    def resolve(self, model_spec) -> Servable:
        """Finds the loaded version a ModelSpec asks for (latest when it names none)."""
        with self._lock:
            version = self._version_for(model_spec)
            versions = self._servables.get(model_spec.name, {})
            if version is None and versions:
                return versions[max(versions)]
            if version in versions:
                return versions[version]
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found for request: {_servable_request(model_spec.name, version)}",
        )

    def statuses(self, model_spec) -> list[get_model_status_pb2.ModelVersionStatus]:
        """The version states GetModelStatus reports for a ModelSpec."""
        with self._lock:
            version = self._version_for(model_spec)
            known = self._statuses.get(model_spec.name, {})
            if not known:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find any versions of model {model_spec.name}",
                )
            if version is not None and version not in known:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {version} of model {model_spec.name}",
                )
            chosen = [version] if version is not None else sorted(known)
            result = []
            for number in chosen:
                status = known[number]
                entry = get_model_status_pb2.ModelVersionStatus(version=number, state=status.state)
                entry.status.error_code = status.error_code
                entry.status.error_message = status.error_message
                result.append(entry)
            return result

    def unavailable_models(self) -> list[str]:
        """Names of configured models with no AVAILABLE version, with their load errors."""
        problems = []
        with self._lock:
            for model in self._config.model_config_list.config:
                if not self._servables.get(model.name):
                    errors = [s.error_message for s in self._statuses.get(model.name, {}).values()]
                    problems.append(
                        f"{model.name} (base_path {model.base_path}): "
                        + ("; ".join(e for e in errors if e) or "no version folders found")
                    )
        return problems


def _serving_call(method):
    """Turns ServingError and unexpected exceptions into gRPC statuses for one RPC method."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as error:
            context.abort(error.code, error.message)
        except Exception as error:  # the server must outlive any bad request
            logger.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    wrapper.__name__ = method.__name__
    return wrapper


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self._registry = registry

    @_serving_call
    def Predict(self, request, context):
        servable = self._registry.resolve(request.model_spec)
        return servable.predict(request, self._registry.limits)

    @_serving_call
    def GetModelMetadata(self, request, context):
        servable = self._registry.resolve(request.model_spec)
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
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response.metadata["signature_def"].Pack(signature_map)
        return response


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self._registry = registry

    @_serving_call
    def GetModelStatus(self, request, context):
        response = get_model_status_pb2.GetModelStatusResponse()
        response.model_version_status.extend(self._registry.statuses(request.model_spec))
        return response


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DevServer:
    """A running devserver; create it with `start_server`.

    Attributes:
        address: "host:port" that clients connect to.
        registry: The `ModelRegistry` serving the models.
        kind: "devserver", to tell it from a `tensorflow_model_server` process.
    """

    kind = "devserver"

    def __init__(self, registry, server, address, poll_seconds, config_file, config_poll_seconds):
        self.registry = registry
        self.address = address
        self._server = server
        self._stop = threading.Event()
        self._poller = None
        if poll_seconds > 0 or (config_file and config_poll_seconds > 0):
            self._poller = threading.Thread(
                target=self._poll,
                args=(poll_seconds, config_file, config_poll_seconds),
                name="devserver-poll",
                daemon=True,
            )
            self._poller.start()

    def _poll(self, poll_seconds, config_file, config_poll_seconds):
        interval = min(s for s in (poll_seconds, config_poll_seconds) if s > 0)
        last_config_read = time.monotonic()
        while not self._stop.wait(interval):
            config = None
            now = time.monotonic()
            if config_file and 0 < config_poll_seconds <= now - last_config_read:
                last_config_read = now
                try:
                    config = model_config_lib.read_model_server_config(config_file)
                except (OSError, ValueError) as error:
                    logger.error("keeping the current config: %s", error)
            try:
                self.registry.sync(config)
            except ValueError as error:
                logger.error("config not applied: %s", error)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stops serving; in-flight requests get `grace` seconds to finish."""
        self._stop.set()
        self._server.stop(grace).wait()
        if self._poller is not None:
            self._poller.join()

    def wait(self) -> None:
        """Blocks until the server stops."""
        self._server.wait_for_termination()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def start_server(
    model_config: str | os.PathLike | model_config_lib.ModelServerConfig,
    port: int = 0,
    host: str = "127.0.0.1",
    base_path_overrides: Mapping[str, str | os.PathLike] | None = None,
    max_batch_size: int = 64,
    max_input_bytes: int = 2048,
    workers: int = 4,
    file_system_poll_wait_seconds: float = 1.0,
    model_config_file_poll_wait_seconds: float = 0.0,
    allow_version_labels_for_unavailable_models: bool = False,
) -> DevServer:
    """Loads the configured models, then starts serving them over gRPC.

    Args:
        model_config: A models.config path or a parsed `ModelServerConfig`.
        port: Port to listen on; 0 picks a free one (see `DevServer.address`).
        host: Interface to bind; the loopback default keeps the server off the network.
        base_path_overrides: Model name to a local base path replacing the config's.
        max_batch_size: Most rows per request input.
        max_input_bytes: Most bytes per input string (elements per row for numeric inputs).
        workers: Threads answering requests concurrently.
        file_system_poll_wait_seconds: How often to look for new version folders, as TF
            Serving's flag; 0 turns it off.
        model_config_file_poll_wait_seconds: How often to re-read `model_config` when it is a
            file (picks up label changes), as TF Serving's flag; 0 turns it off.
        allow_version_labels_for_unavailable_models: As TF Serving's flag.

    Returns:
        The running `DevServer`.

    Raises:
        ValueError: If the config is invalid or a label points at an unavailable version.
        RuntimeError: If a configured model has no loadable version, or the port is taken.
    """
    config_file = None
    if isinstance(model_config, model_config_lib.ModelServerConfig):
        config = model_config
    else:
        config_file = os.fspath(model_config)
        config = model_config_lib.read_model_server_config(config_file)
    if base_path_overrides:
        config = model_config_lib.apply_base_path_overrides(config, base_path_overrides)
        # A re-read file would undo the overrides.
        config_file = None
    registry = ModelRegistry(
        config, Limits(max_batch_size, max_input_bytes), allow_version_labels_for_unavailable_models
    )
    registry.sync()
    problems = registry.unavailable_models()
    if problems:
        raise RuntimeError("no version could be loaded for: " + " | ".join(problems))

    max_message = max(4 << 20, max_batch_size * (max_input_bytes + 64) * 4 + (1 << 20))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="devserver"),
        # Queued requests beyond this get RESOURCE_EXHAUSTED instead of piling up in memory.
        maximum_concurrent_rpcs=workers * 16,
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            # Without this a second server could silently share a port that is in use.
            ("grpc.so_reuseport", 0),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionService(registry), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(registry), server)
    try:
        bound = server.add_insecure_port(_format_address(host, port))
    except RuntimeError as error:
        raise RuntimeError(f"cannot listen on {_format_address(host, port)}: {error}") from None
    if bound == 0:
        raise RuntimeError(f"cannot listen on {_format_address(host, port)}")
    server.start()
    address = _format_address(host, bound)
    logger.info("devserver listening on %s", address)
    return DevServer(
        registry,
        server,
        address,
        file_system_poll_wait_seconds,
        config_file,
        model_config_file_poll_wait_seconds,
    )


class ModelServerProcess:
    """A `tensorflow_model_server` subprocess; create it with `start_model_server`.

    Attributes:
        address: "host:port" that clients connect to.
        kind: "tensorflow_model_server".
        log_path: File holding the server's stdout and stderr.
    """

    kind = "tensorflow_model_server"

    def __init__(self, process: subprocess.Popen, address: str, log_path: str, tmpdir: str):
        self.process = process
        self.address = address
        self.log_path = log_path
        self._tmpdir = tmpdir

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()[-chars:]

    def stop(self, grace: float | None = 5.0) -> None:
        """Terminates the server, killing it if it has not exited after `grace` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_until_available(server: ModelServerProcess, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    channel = grpc.insecure_channel(server.address)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    try:
        pending = list(names)
        while pending:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"tensorflow_model_server exited with code {server.process.returncode}:\n"
                    + server.log_tail()
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"models {pending} not AVAILABLE on {server.address} after {timeout} s:\n"
                    + server.log_tail()
                )
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = pending[0]
            try:
                response = stub.GetModelStatus(request, timeout=2)
                if any(s.state == State.AVAILABLE for s in response.model_version_status):
                    pending.pop(0)
                    continue
            except grpc.RpcError:
                pass  # not listening yet, or the model is still loading
            time.sleep(0.2)
    finally:
        channel.close()


def start_model_server(
    model_config: str | os.PathLike | model_config_lib.ModelServerConfig,
    prefer: str = "auto",
    host: str = "127.0.0.1",
    max_batch_size: int = 64,
    file_system_poll_wait_seconds: float = 1.0,
    allow_version_labels_for_unavailable_models: bool = False,
    timeout: float = 120.0,
    **devserver_kwargs,
) -> DevServer | ModelServerProcess:
    """Starts the real `tensorflow_model_server` when installed, else the devserver.

    Both answer the same gRPC API, so callers (tests, scripts) need not care which one runs.
    Returns once every configured model has an AVAILABLE version.

    Args:
        model_config: A models.config path or a parsed `ModelServerConfig`.
        prefer: "auto", "tensorflow_model_server" (fail if not installed) or "devserver".
        host: Address clients use. The devserver binds only to it; TF Serving has no flag
            for the gRPC interface and listens on all of them.
        max_batch_size: Most rows per request: the devserver's cap, and TF Serving's batching
            `max_batch_size` (it is started with `--enable_batching`, as in production).
        file_system_poll_wait_seconds: How often new version folders are picked up.
        allow_version_labels_for_unavailable_models: As TF Serving's flag.
        timeout: Seconds to wait for `tensorflow_model_server` to load the models.
        **devserver_kwargs: Further `start_server` arguments, used only by the devserver.

    Returns:
        A handle with `.address`, `.kind` ("devserver" or "tensorflow_model_server") and
        `.stop()`.
    """
    if prefer not in ("auto", "tensorflow_model_server", "devserver"):
        raise ValueError(
            f"prefer must be 'auto', 'tensorflow_model_server' or 'devserver', got {prefer!r}"
        )
    binary = shutil.which("tensorflow_model_server")
    if prefer == "tensorflow_model_server" and binary is None:
        raise FileNotFoundError("prefer='tensorflow_model_server' but it is not on PATH")
    if prefer == "devserver" or binary is None:
        return start_server(
            model_config,
            host=host,
            max_batch_size=max_batch_size,
            file_system_poll_wait_seconds=file_system_poll_wait_seconds,
            allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
            **devserver_kwargs,
        )

    tmpdir = tempfile.mkdtemp(prefix="tf_model_server_")
    if isinstance(model_config, model_config_lib.ModelServerConfig):
        config = model_config
        config_file = os.path.join(tmpdir, "models.config")
        model_config_lib.write_model_server_config(config, config_file)
    else:
        config_file = os.fspath(model_config)
        config = model_config_lib.read_model_server_config(config_file)
    batching_file = os.path.join(tmpdir, "batching_parameters.txt")
    with open(batching_file, "w", encoding="utf-8") as file:
        file.write(
            f"max_batch_size {{ value: {max_batch_size} }}\n"
            "batch_timeout_micros { value: 1000 }\n"
            "num_batch_threads { value: 2 }\n"
        )
    port = _free_port(host)
    log_path = os.path.join(tmpdir, "server.log")
    command = [
        binary,
        f"--port={port}",
        "--rest_api_port=0",
        f"--model_config_file={config_file}",
        f"--file_system_poll_wait_seconds={max(1, round(file_system_poll_wait_seconds))}",
        "--enable_batching",
        f"--batching_parameters_file={batching_file}",
    ]
    if allow_version_labels_for_unavailable_models:
        command.append("--allow_version_labels_for_unavailable_models")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = ModelServerProcess(process, _format_address(host, port), log_path, tmpdir)
    try:
        names = [model.name for model in config.model_config_list.config]
        _wait_until_available(server, names, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _parse_override(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.devserver",
        description=(
            "Development stand-in for TensorFlow Serving: serves the models of a models.config "
            "over TF Serving's gRPC API (PredictionService.Predict/GetModelMetadata, "
            "ModelService.GetModelStatus), with the same version policies, labels, warmup and "
            "status codes. NOT a production server: no server-side batching, REST API or "
            "metrics. In production run tensorflow_model_server (serving/OPERATIONS.md)."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_config_file", help="models.config text proto")
    source.add_argument("--model_base_path", help="serve one model from this folder")
    parser.add_argument("--model_name", default="default", help="name for --model_base_path")
    parser.add_argument(
        "--model_base_path_override",
        action="append",
        type=_parse_override,
        default=[],
        metavar="NAME=DIR",
        help="serve model NAME from DIR instead of the config's base_path (repeatable)",
    )
    parser.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: loopback only)"
    )
    parser.add_argument("--max-batch-size", type=int, default=64, help="most rows per input")
    parser.add_argument(
        "--max-input-bytes",
        type=int,
        default=2048,
        help="most bytes per input string (elements per row for numeric inputs)",
    )
    parser.add_argument("--workers", type=int, default=4, help="threads answering requests")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    parser.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0)
    parser.add_argument("--allow_version_labels_for_unavailable_models", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.model_config_file:
        model_config = args.model_config_file
    else:
        model_config = model_config_lib.make_model_server_config(
            {args.model_name: args.model_base_path}
        )
    try:
        server = start_server(
            model_config,
            port=args.port,
            host=args.host,
            base_path_overrides=dict(args.model_base_path_override),
            max_batch_size=args.max_batch_size,
            max_input_bytes=args.max_input_bytes,
            workers=args.workers,
            file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
            model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
            allow_version_labels_for_unavailable_models=(
                args.allow_version_labels_for_unavailable_models
            ),
        )
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
    print(f"devserver listening on {server.address}", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
