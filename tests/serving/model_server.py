"""Starts the model server the serving tests talk to: `tensorflow_model_server` when it is on
PATH, else the devserver; SERVING_TEST_SERVER=devserver|tensorflow_model_server forces one.

Both answer the same gRPC API, so the tests need not care which one runs. The real server runs
as in production (serving/docker-compose.yml): with `--enable_batching` and the shipped
serving/batching_parameters.txt.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from serving import devserver
from serving import model_config as model_config_lib
from serving.devserver.server import format_address

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCHING_PARAMETERS_FILE = os.path.join(REPO, "serving", "batching_parameters.txt")
SERVER_KINDS = ("auto", "tensorflow_model_server", "devserver")


def read_max_batch_size(path: str | os.PathLike) -> int:
    """The `max_batch_size` of a text-format BatchingParameters file.

    The BatchingParameters proto (tensorflow_serving/servables/tensorflow/
    session_bundle_config.proto) is not in the tensorflow-serving-api wheel, so the one field
    is read from the text.

    Raises:
        ValueError: If the file does not hold exactly one `max_batch_size { value: N }`.
    """
    with open(path, encoding="utf-8") as file:
        text = file.read()
    values = re.findall(r"^\s*max_batch_size\s*\{\s*value:\s*(\d+)\s*\}", text, re.MULTILINE)
    if len(values) != 1:
        raise ValueError(
            f"{path}: expected one 'max_batch_size {{ value: N }}' line, found {len(values)}"
        )
    return int(values[0])


# The tests' limits are the shipped batching file's, so both servers refuse the same requests:
# - max_batch_size: TF Serving refuses a request with more rows than the file's max_batch_size
#   (INVALID_ARGUMENT "Task size N is larger than maximum input batch size M", from TensorFlow's
#   core/kernels/batching_util/shared_batch_scheduler.h); the devserver gets the same number as
#   its own cap (`max_batch_size`), so MAX_BATCH_SIZE + 1 rows are INVALID_ARGUMENT on either.
# - batch_timeout_micros, max_enqueued_batches, num_batch_threads, pad_variable_length_inputs:
#   they only shape how concurrent requests are merged; the shared fixtures run the devserver
#   without batching (its batching, `batching_parameters=`, is tested in test_batching.py).
# - The devserver's `max_input_bytes` (bytes per string) has no TF Serving counterpart; the test
#   of it skips on the real server.
MAX_BATCH_SIZE = read_max_batch_size(BATCHING_PARAMETERS_FILE)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may take it before it is used)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    """`tensorflow_model_server` exited while starting.

    Attributes:
        code: The `grpc.StatusCode` of its "Failed to start server. Error: CODE: message" line
            (tensorflow_serving/model_servers/main.cc, `main`), None if the log has none.
        details: The message of that line.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None, details: str):
        super().__init__(message)
        self.code = code
        self.details = details


def _start_error(log: str) -> tuple[grpc.StatusCode | None, str]:
    match = re.search(r"Failed to start server\. Error: ([A-Z_]+): (.*)", log)
    if match is None or match[1] not in grpc.StatusCode.__members__:
        return None, ""
    return grpc.StatusCode[match[1]], match[2].strip()


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


def _wait_until_available(server: ModelServerProcess, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    channel = grpc.insecure_channel(server.address)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    available = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE
    try:
        pending = list(names)
        while pending:
            if server.process.poll() is not None:
                log = server.log_tail()
                raise ServerStartError(
                    f"tensorflow_model_server exited with code {server.process.returncode}:\n"
                    + log,
                    *_start_error(log),
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
                if any(s.state == available for s in response.model_version_status):
                    pending.pop(0)
                    continue
            except grpc.RpcError:
                pass  # not listening yet, or the model is still loading
            time.sleep(0.2)
    finally:
        channel.close()


def start_model_server(
    model_config: str | os.PathLike | model_config_lib.ModelServerConfig,
    prefer: str | None = None,
    host: str = "127.0.0.1",
    file_system_poll_wait_seconds: float = 1.0,
    allow_version_labels_for_unavailable_models: bool = False,
    xla_cpu_compilation_enabled: bool = False,
    timeout: float = 120.0,
    **devserver_kwargs,
) -> devserver.DevServer | ModelServerProcess:
    """Starts the real `tensorflow_model_server` when installed, else the devserver.

    Returns once every configured model has an AVAILABLE version.

    Args:
        model_config: A models.config path or a parsed `ModelServerConfig`.
        prefer: "auto", "tensorflow_model_server" (fail if not installed) or "devserver";
            None reads SERVING_TEST_SERVER, "auto" when it is unset.
        host: Address clients use. The devserver binds only to it; TF Serving has no flag
            for the gRPC interface and listens on all of them.
        file_system_poll_wait_seconds: How often new version folders are picked up.
        allow_version_labels_for_unavailable_models: As TF Serving's flag; a config with
            `version_labels` needs it to start at all, on both servers (labels are checked
            before anything is loaded: `ServerCore::ReloadConfig`, server_core.cc).
        xla_cpu_compilation_enabled: As TF Serving's flag (exports made with `--jit-compile`
            need it), given to either server.
        timeout: Seconds to wait for `tensorflow_model_server` to load the models.
        **devserver_kwargs: Further `serving.devserver.start_server` arguments, used only by
            the devserver; not `max_batch_size`, which is the shipped batching file's.
            `model_config_file_poll_wait_seconds` (re-read the config file) is passed to
            `tensorflow_model_server` too, as its flag of that name (whole seconds, at least 1).

    Returns:
        A handle with `.address`, `.kind` ("devserver" or "tensorflow_model_server") and
        `.stop()`.

    Raises:
        ServerStartError: If `tensorflow_model_server` exits while starting.
        serving.devserver.errors.ConfigRefusedError: If the devserver refuses the config.
    """
    if prefer is None:
        prefer = os.environ.get("SERVING_TEST_SERVER", "auto")
    if prefer not in SERVER_KINDS:
        raise ValueError(
            f"prefer (default: SERVING_TEST_SERVER) must be one of {SERVER_KINDS}, got {prefer!r}"
        )
    if "max_batch_size" in devserver_kwargs:
        raise ValueError(
            f"max_batch_size={devserver_kwargs['max_batch_size']} given, but both servers take "
            f"it from {BATCHING_PARAMETERS_FILE} (max_batch_size {MAX_BATCH_SIZE}), so that "
            "they refuse the same requests"
        )
    binary = shutil.which("tensorflow_model_server")
    if prefer == "tensorflow_model_server" and binary is None:
        raise FileNotFoundError("prefer='tensorflow_model_server' but it is not on PATH")
    if prefer == "devserver" or binary is None:
        return devserver.start_server(
            model_config,
            host=host,
            max_batch_size=MAX_BATCH_SIZE,
            file_system_poll_wait_seconds=file_system_poll_wait_seconds,
            allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
            xla_cpu_compilation_enabled=xla_cpu_compilation_enabled,
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
    port = free_port(host)
    log_path = os.path.join(tmpdir, "server.log")
    command = [
        binary,
        f"--port={port}",
        "--rest_api_port=0",
        f"--model_config_file={config_file}",
        f"--file_system_poll_wait_seconds={max(1, round(file_system_poll_wait_seconds))}",
        "--enable_batching",
        f"--batching_parameters_file={BATCHING_PARAMETERS_FILE}",
    ]
    if allow_version_labels_for_unavailable_models:
        command.append("--allow_version_labels_for_unavailable_models")
    if xla_cpu_compilation_enabled:
        command.append("--xla_cpu_compilation_enabled=true")
    config_poll = devserver_kwargs.get("model_config_file_poll_wait_seconds")
    if config_poll:
        command.append(f"--model_config_file_poll_wait_seconds={max(1, round(config_poll))}")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = ModelServerProcess(process, format_address(host, port), log_path, tmpdir)
    try:
        names = [model.name for model in config.model_config_list.config]
        _wait_until_available(server, names, timeout)
    except BaseException:
        server.stop()
        raise
    return server
