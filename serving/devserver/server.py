"""Starting and stopping the devserver: load the configured models, listen on gRPC, and poll the
version folders and the config file as TF Serving's `--file_system_poll_wait_seconds` and
`--model_config_file_poll_wait_seconds` do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent import futures

import grpc

from serving import model_config as model_config_lib
from serving.devserver.batching import BatchingParameters, BatchScheduler
from serving.devserver.registry import ModelRegistry
from serving.devserver.requests import Limits
from serving.devserver.services import ServingServicer

logger = logging.getLogger(__name__)


def format_address(host: str, port: int) -> str:
    """The "host:port" clients connect to, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DevServer(contextlib.AbstractContextManager):
    """A running devserver; create it with `start_server`. Used in a `with` block, it stops at
    the end of the block.

    Attributes:
        address: "host:port" that clients connect to.
        registry: The `ModelRegistry` serving the models.
        kind: "devserver", to tell it from a `tensorflow_model_server` process.
    """

    kind = "devserver"

    def __init__(
        self,
        registry,
        server,
        address,
        poll_seconds,
        config_file,
        config_poll_seconds,
        batching=None,
    ):
        self.registry = registry
        self.address = address
        self.batching = batching
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
        if self.batching is not None:
            self.batching.stop()
            # Read by benchmarks/serving_load.py (the mean batch size under load).
            logger.info(
                "batching: %d batches, %d requests",
                self.batching.batches_run,
                self.batching.requests_run,
            )
        if self._poller is not None:
            self._poller.join()

    def wait(self) -> None:
        """Blocks until the server stops."""
        self._server.wait_for_termination()

    def __exit__(self, *exc_info):
        self.stop()


def start_server(
    model_config: str | os.PathLike | model_config_lib.ModelServerConfig,
    port: int = 0,
    host: str = "127.0.0.1",
    base_path_overrides: Mapping[str, str | os.PathLike] | None = None,
    max_batch_size: int = 64,
    max_input_bytes: int | None = None,
    workers: int = 4,
    file_system_poll_wait_seconds: float = 1.0,
    model_config_file_poll_wait_seconds: float = 0.0,
    allow_version_labels_for_unavailable_models: bool = False,
    batching_parameters: BatchingParameters | None = None,
    xla_cpu_compilation_enabled: bool = False,
) -> DevServer:
    """Loads the configured models, then starts serving them over gRPC.

    Args:
        model_config: A models.config path or a parsed `ModelServerConfig`.
        port: Port to listen on; 0 picks a free one (see `DevServer.address`).
        host: Interface to bind; the loopback default keeps the server off the network.
        base_path_overrides: Model name to a local base path replacing the config's.
        max_batch_size: Most rows per request input.
        max_input_bytes: Most bytes per input string (elements per row for numeric inputs);
            None (TF Serving's behaviour) for no cap.
        workers: Threads answering requests concurrently.
        file_system_poll_wait_seconds: How often to look for new version folders, as TF
            Serving's flag; 0 turns it off.
        model_config_file_poll_wait_seconds: How often to re-read `model_config` when it is a
            file (picks up label changes), as TF Serving's flag; 0 turns it off.
        allow_version_labels_for_unavailable_models: As TF Serving's flag.
        batching_parameters: Batch concurrent requests to a signature, as TF Serving's
            `--enable_batching` with these parameters; None runs each request on its own.
            Only requests that hold one of the `workers` threads can join a batch, so give at
            least as many workers as requests should be merged.
        xla_cpu_compilation_enabled: As TF Serving's flag: without it, models with functions
            compiled by XLA (exports made with `--jit-compile`) fail every decoding request and
            their warmup (see `Servable`).

    Returns:
        The running `DevServer`.

    Raises:
        ValueError: If the config is invalid, or refused as TF Serving refuses it
            (`ConfigRefusedError`: e.g. a label without
            `allow_version_labels_for_unavailable_models`, since nothing is loaded yet).
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
        config,
        Limits(max_batch_size, max_input_bytes),
        allow_version_labels_for_unavailable_models,
        xla_cpu_compilation_enabled,
    )
    registry.sync()
    problems = registry.unavailable_models()
    if problems:
        raise RuntimeError("no version could be loaded for: " + " | ".join(problems))

    if max_input_bytes is None:
        max_message = (1 << 31) - 1  # TF Serving's SetMaxMessageSize (model_servers/server.cc)
    else:
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
    batching = None if batching_parameters is None else BatchScheduler(batching_parameters)
    ServingServicer(registry, batching).add_to_server(server)
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        raise RuntimeError(f"cannot listen on {address}: {error}") from None
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")
    server.start()
    address = format_address(host, bound)
    logger.info("devserver listening on %s", address)
    return DevServer(
        registry,
        server,
        address,
        file_system_poll_wait_seconds,
        config_file,
        model_config_file_poll_wait_seconds,
        batching,
    )
