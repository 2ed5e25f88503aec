"""gRPC client for the exported translator on TF Serving (or the devserver): library and command.

python -m serving.client --server localhost:8500 --label stable --wait 60 "ein Satz" < more.txt
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from quiet_logs import add_verbose_argument

_STATES = get_model_status_pb2.ModelVersionStatus.State


class TranslationClientError(Exception):
    """A request to the model server failed.

    Attributes:
        code: The gRPC status code, or None when the failure was not a gRPC status.
        details: The server's own message.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


class ModelNotFoundError(TranslationClientError):
    """The server has no such model, version or label (NOT_FOUND)."""


class SignatureNotFoundError(TranslationClientError):
    """The model has no signature of that name (FAILED_PRECONDITION)."""


class InvalidInputError(TranslationClientError):
    """The server rejected the inputs: name, dtype, shape or size (INVALID_ARGUMENT)."""


class ServerUnavailableError(TranslationClientError):
    """The server could not be reached, even after retries (UNAVAILABLE)."""


class DeadlineExceededError(TranslationClientError):
    """The server did not answer within the deadline (DEADLINE_EXCEEDED)."""


def backoff_delay(
    attempt: int, backoff: float, max_backoff: float, rng: random.Random | None = None
) -> float:
    """Seconds to sleep before retry number `attempt` (0 for the first retry).

    Exponential with jitter: a random point in [cap / 2, cap], where cap is
    `min(max_backoff, backoff * 2**attempt)`. Without jitter, clients that failed together (a
    server restart) would all come back at the same instants and fail together again.
    """
    cap = min(max_backoff, backoff * 2**attempt)
    return (rng or random).uniform(cap / 2, cap)


class TranslationClient:
    """Talks to TF Serving's PredictionService and ModelService for one model.

    Args:
        server: "host:port" of the gRPC endpoint.
        model: Model name from the server's models.config.
        signature: Signature used by `translate` and by default by `predict`.
        version: Pin a model version number; None lets the server pick (the latest it serves).
        label: Pin a version label such as "stable" or "canary"; excludes `version`.
        timeout: Deadline in seconds for each RPC.
        max_batch_size: Most lines sent in one request by `translate`; keep it at or under the
            server's batching `max_batch_size`.
        retries: How many times to retry an RPC that failed with UNAVAILABLE. Requests are
            side-effect free, so retrying is safe; DEADLINE_EXCEEDED is not retried because the
            server may still be working on the request.
        backoff: Upper bound in seconds of the first retry's delay; doubled for each further
            retry, up to `max_backoff`, with jitter (see `backoff_delay`).
        max_backoff: Longest delay between two attempts.
        tls: Connect over TLS (TF Serving's `--ssl_config_file`, or a TLS proxy in front of it).
        ca_file: PEM file of the certificate authority to trust (e.g. a self-signed server
            certificate); None trusts the system's roots. Only with `tls`.
        seed: Seeds the jitter, for reproducible delays in tests; None for a random seed.

    Example:
        >>> with TranslationClient("localhost:8500", label="stable") as client:
        ...     client.translate(["Ein Mann fährt Fahrrad."])
    """

    def __init__(
        self,
        server: str = "localhost:8500",
        model: str = "transformer",
        signature: str = "serving_default",
        version: int | None = None,
        label: str | None = None,
        timeout: float = 30.0,
        max_batch_size: int = 64,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        tls: bool = False,
        ca_file: str | None = None,
        seed: int | None = None,
    ):
        if version is not None and label is not None:
            raise ValueError(f"give a version or a label, not both: version={version}, {label=}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        if backoff <= 0 or max_backoff < backoff:
            raise ValueError(
                f"need 0 < backoff <= max_backoff, got backoff={backoff}, {max_backoff=}"
            )
        if ca_file is not None and not tls:
            raise ValueError(f"ca_file={ca_file!r} is given but tls is off; pass tls=True")
        self.server = server
        self.model = model
        self.signature = signature
        self.version = version
        self.label = label
        self.timeout = timeout
        self.max_batch_size = max_batch_size
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.tls = tls
        self._rng = random.Random(seed)
        # gRPC waits 1 s or more before reconnecting to a server that refused a connection, and
        # RPCs fail at once meanwhile; matching it to our backoff makes the retries count.
        reconnect_ms = max(100, int(backoff * 1000))
        options = [
            ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
            ("grpc.min_reconnect_backoff_ms", reconnect_ms),
        ]
        if tls:
            root_certificates = None
            if ca_file is not None:
                try:
                    with open(ca_file, "rb") as file:
                        root_certificates = file.read()
                except OSError as error:
                    raise ValueError(f"cannot read ca_file {ca_file!r}: {error}") from None
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(server, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(server, options=options)
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _model_spec(self, spec, signature: str | None = None) -> None:
        spec.name = self.model
        if self.version is not None:
            spec.version.value = self.version
        elif self.label is not None:
            spec.version_label = self.label
        if signature is not None:
            spec.signature_name = signature

    def _describe(self, signature: str | None = None) -> str:
        text = f"model {self.model!r}"
        if self.version is not None:
            text += f" version {self.version}"
        if self.label is not None:
            text += f" label {self.label!r}"
        if signature is not None:
            text += f" signature {signature!r}"
        return f"{text} on {self.server}" + (" (TLS)" if self.tls else "")

    def retry_delay(self, attempt: int) -> float:
        """The jittered delay before retry `attempt` (0 for the first); see `backoff_delay`."""
        return backoff_delay(attempt, self.backoff, self.max_backoff, self._rng)

    def _call(self, method, request, what: str, retries: int | None = None):
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                if code == grpc.StatusCode.UNAVAILABLE and attempt < retries:
                    time.sleep(self.retry_delay(attempt))
                    continue
                raise _error_for(code, details, what, retries) from None
        raise AssertionError("unreachable")

    def wait_until_available(self, timeout: float) -> list[dict[str, object]]:
        """Waits until the server answers and reports the model AVAILABLE.

        Polls `GetModelStatus` (with jittered backoff) while the server is unreachable, the
        model unknown (not loaded yet) or no version AVAILABLE; with a pinned version, until
        that version is AVAILABLE. TF Serving's `GetModelStatus` ignores labels, so with a
        label this waits for any version. Lets a client start together with the server.

        Args:
            timeout: Most seconds to wait.

        Returns:
            The model's status (see `status`) once available.

        Raises:
            ServerUnavailableError: If the model is not available within `timeout`, with the
                last answer seen.
            TranslationClientError: For any other failure (e.g. INVALID_ARGUMENT).
        """
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            try:
                versions = self.status(retries=0)
                ready = [v for v in versions if v["state"] == "AVAILABLE"]
                if self.version is not None:
                    ready = [v for v in ready if v["version"] == self.version]
                if ready:
                    return versions
                last = f"versions {[(v['version'], v['state']) for v in versions]}"
            except (ServerUnavailableError, ModelNotFoundError) as error:
                last = str(error)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"{self._describe()}: not AVAILABLE after waiting {timeout:g} s; last: {last}",
                    grpc.StatusCode.UNAVAILABLE,
                    last,
                )
            time.sleep(min(remaining, self.retry_delay(attempt)))
            attempt += 1

    def predict_response(
        self,
        inputs: Mapping[str, object],
        signature: str | None = None,
        output_filter: Sequence[str] = (),
    ) -> predict_pb2.PredictResponse:
        """Sends one PredictRequest and returns the raw response (it names the version used).

        Args:
            inputs: Input alias to an array-like; strings are sent as DT_STRING.
            signature: Signature name; the client's `signature` when None.
            output_filter: Output aliases to return; all when empty.
        """
        signature = signature or self.signature
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, signature)
        for alias, value in inputs.items():
            request.inputs[alias].CopyFrom(_tensor_proto(value))
        request.output_filter.extend(output_filter)
        return self._call(self._predictions.Predict, request, self._describe(signature))

    def predict(
        self,
        inputs: Mapping[str, object],
        signature: str | None = None,
        output_filter: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Runs a signature on `inputs`; returns output alias to numpy array (bytes for strings).

        Raises:
            TranslationClientError: Or one of its subclasses, naming what went wrong.
        """
        response = self.predict_response(inputs, signature, output_filter)
        return {alias: tf.make_ndarray(proto) for alias, proto in response.outputs.items()}

    def translate(self, lines: Sequence[str], signature: str | None = None) -> list[str]:
        """Translates lines, sending at most `max_batch_size` per request, in order.

        Args:
            lines: Source sentences, one per element.
            signature: A text signature ("serving_default", "greedy", "beam"); the client's
                `signature` when None.

        Returns:
            One translation per line, in the order of `lines`.

        Raises:
            TypeError: If `lines` is a single string or holds something other than strings.
            TranslationClientError: Or one of its subclasses, naming what went wrong.
        """
        if isinstance(lines, (str, bytes)):
            raise TypeError(f"lines must be a sequence of strings, not one string: {lines[:50]!r}")
        lines = list(lines)
        for index, line in enumerate(lines):
            if not isinstance(line, str):
                raise TypeError(f"lines[{index}] is {type(line).__name__}, not str: {line!r}")
        translations = []
        for start in range(0, len(lines), self.max_batch_size):
            batch = lines[start : start + self.max_batch_size]
            outputs = self.predict(
                {"text": np.array([line.encode("utf-8") for line in batch], dtype=object)},
                signature,
                output_filter=["translations"],
            )
            result = outputs["translations"].reshape(-1)
            if len(result) != len(batch):
                raise TranslationClientError(
                    f"{self._describe(signature)} returned {len(result)} translations for "
                    f"{len(batch)} lines"
                )
            translations.extend(value.decode("utf-8") for value in result)
        return translations

    def metadata(self) -> dict[str, dict[str, dict[str, tuple[str, list[int]]]]]:
        """Describes the model's signatures.

        Returns:
            Signature name to {"inputs": ..., "outputs": ...}, each alias to (dtype name, shape),
            -1 for an unknown dimension; e.g. `{"beam": {"inputs": {"text": ("string", [-1])}}}`.
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec)
        response = self._call(self._predictions.GetModelMetadata, request, self._describe())
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        result = {}
        for name, signature_def in signature_map.signature_def.items():
            if name.startswith("__"):  # "__saved_model_init_op" is not callable
                continue
            result[name] = {
                kind: {
                    alias: (
                        tf.dtypes.as_dtype(info.dtype).name,
                        [dim.size for dim in info.tensor_shape.dim],
                    )
                    for alias, info in getattr(signature_def, kind).items()
                }
                for kind in ("inputs", "outputs")
            }
        return result

    def status(self, retries: int | None = None) -> list[dict[str, object]]:
        """Lists the model's versions as the server reports them, newest first.

        Args:
            retries: Retries on UNAVAILABLE; the client's `retries` when None.

        Returns:
            One dict per version: {"version": int, "state": "AVAILABLE" (or "LOADING", "END",
            ...), "error_code": int, "error_message": str}. A pinned label does not filter
            them: TF Serving's GetModelStatus ignores labels.
        """
        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec)
        response = self._call(
            self._models.GetModelStatus, request, self._describe(), retries=retries
        )
        return [
            {
                "version": entry.version,
                "state": _STATES.Name(entry.state),
                "error_code": entry.status.error_code,
                "error_message": entry.status.error_message,
            }
            for entry in response.model_version_status
        ]


def _tensor_proto(value):
    array = np.asarray(value)
    if array.dtype.kind == "U":
        array = np.vectorize(lambda text: text.encode("utf-8"), otypes=[object])(array)
    if array.dtype.kind in ("O", "S"):
        return tf.make_tensor_proto(array, dtype=tf.string, shape=array.shape)
    return tf.make_tensor_proto(array)


def _error_for(code: grpc.StatusCode, details: str, what: str, retries: int):
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFoundError(f"{what}: not found: {details}", code, details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return SignatureNotFoundError(f"{what}: {details}", code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(f"{what}: invalid request: {details}", code, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(
            f"{what}: server unavailable after {retries + 1} attempts: {details}", code, details
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{what}: no answer before the deadline", code, details)
    return TranslationClientError(f"{what}: {code.name}: {details}", code, details)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        description="Translate TEXT arguments, or stdin lines, with a served model; one "
        "translation per line on stdout.",
    )
    parser.add_argument("text", nargs="*", metavar="TEXT", help="sentences; stdin when none")
    parser.add_argument("--server", default="localhost:8500", help="gRPC host:port")
    parser.add_argument("--model", default="transformer", help="model name")
    parser.add_argument(
        "--signature", default="serving_default", help="serving_default, greedy or beam"
    )
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument("--model-version", type=int, metavar="N", help="model version number to use")
    pin.add_argument("--label", help="version label to use, e.g. stable or canary")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--batch-size", type=int, default=64, help="lines per request")
    parser.add_argument("--retries", type=int, default=3, help="retries when unavailable")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the server to report the model AVAILABLE "
        "(start the client together with the server)",
    )
    parser.add_argument("--tls", action="store_true", help="connect over TLS")
    parser.add_argument(
        "--ca-file", metavar="PEM", help="with --tls: CA certificate to trust (default: system)"
    )
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.ca_file and not args.tls:
        parser.error("--ca-file needs --tls")
    if args.wait < 0:
        parser.error(f"--wait must be 0 or more seconds, got {args.wait}")

    lines = args.text or [line.rstrip("\r\n") for line in sys.stdin]
    try:
        with TranslationClient(
            args.server,
            args.model,
            args.signature,
            version=args.model_version,
            label=args.label,
            timeout=args.timeout,
            max_batch_size=args.batch_size,
            retries=args.retries,
            tls=args.tls,
            ca_file=args.ca_file,
        ) as client:
            if args.wait > 0:
                client.wait_until_available(args.wait)
            translations = client.translate(lines)
    except (TranslationClientError, ValueError) as error:
        print(f"error: {error}".replace("\n", " "), file=sys.stderr, flush=True)
        return 1
    for translation in translations:
        # A newline inside a translation would break the one-line-per-input contract.
        print(translation.replace("\n", " "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
