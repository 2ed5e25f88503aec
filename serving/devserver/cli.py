"""The `python -m serving.devserver` command: serve a models.config (or one model folder) until
interrupted; its flags are named as tensorflow_model_server's where they mean the same.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from quiet_logs import add_verbose_argument
from serving import model_config as model_config_lib
from serving.devserver.batching import BatchingParameters, read_batching_parameters
from serving.devserver.server import start_server


def _parse_override(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.devserver",
        description=(
            "Development stand-in for TensorFlow Serving: serves the models of a models.config "
            "over TF Serving's gRPC API (PredictionService.Predict/GetModelMetadata, "
            "ModelService.GetModelStatus), with the same version policies, labels, warmup, "
            "server-side batching and status codes. NOT a production server: no REST API or "
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
        default=None,
        help="most bytes per input string (elements per row for numeric inputs); no cap by "
        "default, like TF Serving (the export truncates long inputs itself)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="threads answering requests (default 4; with --enable_batching twice the batching "
        "max_batch_size, at most 256, since only requests holding a thread can join a batch)",
    )
    parser.add_argument(
        "--enable_batching",
        action="store_true",
        help="as TF Serving's flag: merge concurrent requests to a signature into one call",
    )
    parser.add_argument(
        "--batching_parameters_file",
        help="text-format BatchingParameters (e.g. serving/batching_parameters.txt); needs "
        "--enable_batching; TF Serving's defaults without it",
    )
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    parser.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0)
    parser.add_argument(
        "--allow_version_labels_for_unavailable_models",
        action="store_true",
        help="as TF Serving's flag: without it, any version_labels in the config are refused "
        "at startup (labels are checked before anything loads); moving an existing label to "
        "a version that is not loaded is refused even with it",
    )
    parser.add_argument(
        "--xla_cpu_compilation_enabled",
        nargs="?",
        const="true",
        default="false",
        type=_parse_bool,
        help="as TF Serving's flag (also =true/=false): needed by exports made with "
        "--jit-compile, which otherwise fail their warmup and every request (INTERNAL)",
    )
    add_verbose_argument(parser)
    return parser


def _parse_bool(text: str) -> bool:
    # TF Serving's boolean flags (ParseBoolFlag in tensorflow/core/util/command_line_flags.cc)
    # take `--flag`, `--flag=true` and `--flag=false`; 1 and 0 are accepted here too.
    value = text.lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit status (1 when the models cannot be served)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # As tensorflow_serving/model_servers/server.cc (Server::BuildAndStart).
    batching_parameters = None
    if args.enable_batching:
        try:
            batching_parameters = (
                read_batching_parameters(args.batching_parameters_file)
                if args.batching_parameters_file
                else BatchingParameters(thread_pool_name="model_server_batch_threads")
            )
        except (OSError, ValueError) as error:
            print(f"error: --batching_parameters_file: {error}", file=sys.stderr, flush=True)
            return 1
    elif args.batching_parameters_file:
        print(
            "error: server_options.batching_parameters_file is set without setting "
            "server_options.enable_batching to true.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    workers = args.workers
    if workers is None:
        # session_bundle_config.proto: "use 'max_batch_size * 2' client threads" (capped: a
        # waiting request costs a thread here).
        workers = (
            4 if batching_parameters is None else min(256, 2 * batching_parameters.max_batch_size)
        )

    if args.model_config_file:
        model_config = args.model_config_file
    else:
        # Made absolute here for convenience; TF Serving itself refuses relative base paths.
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
            workers=workers,
            file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
            model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
            allow_version_labels_for_unavailable_models=(
                args.allow_version_labels_for_unavailable_models
            ),
            batching_parameters=batching_parameters,
            xla_cpu_compilation_enabled=args.xla_cpu_compilation_enabled,
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
