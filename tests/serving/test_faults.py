"""Faults the devserver must survive, each on the tiny trained export with fixed seeds: the
server killed (SIGKILL) under load and restarted; a half-written or corrupt version folder; a
request flood past the caps; 1,000 randomly malformed requests.

Status codes are TF Serving's (see test_parity_table.py for their sources); the devserver is
started directly, since these faults are about its own process, threads and queues.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from model_server import BATCHING_PARAMETERS_FILE, REPO, free_port
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tiny_run import tiny_export

from serving import devserver
from serving.client import TranslationClient
from serving.devserver.batching import BatchingParameters, read_batching_parameters
from serving.model_config import make_model_server_config

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def export_base(tmp_path_factory, shared_data_dir):
    return tiny_export(tmp_path_factory, shared_data_dir)


@pytest.fixture(scope="module")
def sentences(shared_data_dir):
    return (shared_data_dir / "multi30k" / "test_2016_flickr.en").read_text().splitlines()[:24]


@pytest.fixture(scope="module")
def expected(export_base, sentences):
    """Sentence -> its translation by the export's serving_default, in this process."""
    import tensorflow_text  # noqa: F401 - the export's SentencePiece ops

    function = tf.saved_model.load(str(export_base / "1")).signatures["serving_default"]
    return {
        sentence: function(text=tf.constant([sentence]))["translations"].numpy()[0].decode()
        for sentence in sentences
    }


def _predict_request(signature="", model="transformer", **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for alias, value in inputs.items():
        if not isinstance(value, type(request.inputs[alias])):
            value = tf.make_tensor_proto(value)
        request.inputs[alias].CopyFrom(value)
    return request


def _translation(response) -> str:
    return tf.make_ndarray(response.outputs["translations"])[0].decode()


# -- SIGKILL under load ----------------------------------------------------------------------


class _DevserverProcess:
    """`python -m serving.devserver` with the shipped batching file, on a fixed port."""

    def __init__(self, base, port, log_path):
        command = [sys.executable, "-m", "serving.devserver", "--model_base_path", str(base)]
        command += ["--model_name", "transformer", "--port", str(port)]
        command += ["--enable_batching", "--batching_parameters_file", BATCHING_PARAMETERS_FILE]
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in wait_exit
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_listening(self, timeout=300):
        deadline = time.monotonic() + timeout
        while not re.search("devserver listening on", self.log_path.read_text()):
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the devserver did not start"
            time.sleep(0.1)

    def wait_exit(self):
        self.process.wait(60)
        self._log.close()


def test_sigkill_under_load_then_restart_client_retries_carry_every_request(
    export_base, sentences, expected, tmp_path
):
    port = free_port()
    server = _DevserverProcess(export_base, port, tmp_path / "first.log")
    restarted = None
    answers, lock = [], threading.Lock()
    try:
        server.wait_listening()

        def client_loop(lines):
            # Jittered backoff from 0.1-0.2 s up to 1-2 s: 100 retries wait 97-194 s in all,
            # longer than a restart (10-60 s here), and the clients see the new server soon.
            client = TranslationClient(
                f"127.0.0.1:{port}", timeout=60, retries=100, backoff=0.2, max_backoff=2.0, seed=0
            )
            with client as c:
                for line in lines:
                    (translation,) = c.translate([line])
                    with lock:
                        answers.append((line, translation, time.monotonic()))

        with futures.ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(client_loop, sentences[i::4]) for i in range(4)]
            while len(answers) < 4:
                assert not any(job.done() and job.exception() for job in jobs)
                time.sleep(0.01)
            os.kill(server.process.pid, signal.SIGKILL)
            server.wait_exit()
            killed_at, answered_before_kill = time.monotonic(), len(answers)
            assert server.process.returncode == -signal.SIGKILL
            restarted = _DevserverProcess(export_base, port, tmp_path / "second.log")
            restarted.wait_listening()
            for job in jobs:
                job.result(timeout=300)  # a client error would be raised here
    finally:
        for process in (server, restarted):
            if process is not None and process.process.poll() is None:
                process.process.kill()
                process.wait_exit()
    assert answered_before_kill < len(sentences)  # the kill came during the load
    assert sum(at > killed_at for _, _, at in answers) >= len(sentences) - answered_before_kill
    assert sorted(line for line, _, _ in answers) == sorted(sentences)
    assert [translation for line, translation, _ in answers] == [
        expected[line] for line, _, _ in answers
    ]


# -- a broken version folder -----------------------------------------------------------------


def _half_written(version_dir):
    path = version_dir / "saved_model.pb"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_variables(version_dir):
    for path in (version_dir / "variables").glob("variables.data-*"):
        data = bytearray(path.read_bytes())
        data[:: max(1, len(data) // 64)] = b"\x00" * len(data[:: max(1, len(data) // 64)])
        path.write_bytes(bytes(reversed(data)))


@pytest.mark.parametrize("damage", [_half_written, _corrupt_variables])
def test_a_broken_new_version_leaves_the_previous_one_serving(
    export_base, sentences, expected, tmp_path, damage
):
    base = tmp_path / "transformer"
    shutil.copytree(export_base / "1", base / "1")
    config = make_model_server_config({"transformer": base})
    with devserver.start_server(config, file_system_poll_wait_seconds=0.2) as server:
        staging = tmp_path / "staging"
        shutil.copytree(export_base / "1", staging)
        damage(staging)
        os.rename(staging, base / "2")  # appears at once, as a copy in progress would
        with TranslationClient(server.address, model="transformer") as client:
            deadline = time.monotonic() + 120
            while not any(s["version"] == 2 and s["state"] == "END" for s in client.status()):
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.1)
            status = {s["version"]: s for s in client.status()}
            assert status[1]["state"] == "AVAILABLE"
            assert status[2]["error_code"] != 0
            assert re.search(r"version 2 .*failed", status[2]["error_message"])
            # Still served, by version 1, after more polls.
            time.sleep(0.5)
            response = client.predict_response({"text": [sentences[0].encode()]})
            assert response.model_spec.version.value == 1
            assert _translation(response) == expected[sentences[0]]


# -- floods ----------------------------------------------------------------------------------


def _flood(address, requests):
    """Sends the requests at once, each on its own channel; (code, details, response)s."""
    barrier = threading.Barrier(len(requests))

    def send(request):
        with grpc.insecure_channel(address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            barrier.wait()
            try:
                return OK, "", stub.Predict(request, timeout=120)
            except grpc.RpcError as error:
                return error.code(), error.details(), None

    with futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def test_a_flood_past_the_batching_queue_gets_unavailable_and_the_server_keeps_serving(
    export_base, sentences, expected
):
    params = BatchingParameters(max_batch_size=1, max_enqueued_batches=1, num_batch_threads=1)
    config = make_model_server_config({"transformer": export_base})
    with devserver.start_server(
        config, workers=32, file_system_poll_wait_seconds=0, batching_parameters=params
    ) as server:
        lines = [sentences[i % len(sentences)] for i in range(32)]
        results = _flood(server.address, [_predict_request(text=[line]) for line in lines])
        codes = [code for code, _, _ in results]
        assert set(codes) == {OK, grpc.StatusCode.UNAVAILABLE}, codes
        for line, (code, details, response) in zip(lines, results, strict=True):
            if code == OK:
                assert _translation(response) == expected[line]
            else:
                assert "batch scheduling queue to which this task was submitted is full" in details
        with TranslationClient(server.address, retries=0, max_batch_size=1) as client:
            assert client.translate(sentences[:2]) == [expected[s] for s in sentences[:2]]


def test_a_flood_past_the_concurrency_cap_gets_resource_exhausted(export_base, sentences):
    """Without batching, RPCs beyond the cap (workers x 16) are refused with RESOURCE_EXHAUSTED,
    the code gRPC gives TF Serving when its --grpc_max_threads are all busy
    (kServerThreadpoolExhausted, grpc src/cpp/server/server_cc.cc)."""
    config = make_model_server_config({"transformer": export_base})
    with devserver.start_server(config, workers=1, file_system_poll_wait_seconds=0) as server:
        results = _flood(server.address, [_predict_request(text=[sentences[0]])] * 40)
        codes = [code for code, _, _ in results]
        assert set(codes) == {OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        with TranslationClient(server.address, retries=0) as client:
            assert client.translate([""]) == [""]


# -- 1,000 malformed requests ----------------------------------------------------------------


def _raw_predict(channel):
    return channel.unary_unary(
        "/tensorflow.serving.PredictionService/Predict",
        request_serializer=lambda data: data,
        response_deserializer=predict_pb2.PredictResponse.FromString,
    )


def _malformed(rng):
    """One random malformed (or awkward but valid) request: (kind, bytes, expected code)."""
    kind = rng.choice(
        [
            "wrong_dtype",
            "wrong_rank",
            "empty_strings",
            "huge_string",
            "invalid_utf8",
            "unknown_alias",
            "extra_alias",
            "no_inputs",
            "unknown_signature",
            "unknown_model",
            "unknown_version",
            "unknown_output",
            "unknown_proto_field",
            "not_a_proto",
            "content_size_mismatch",
            "negative_dim",
            "too_many_rows",
            "ids_out_of_range",
            "ids_wrong_dtype",
            "ids_wrong_rank",
            "empty_model_name",
        ]
    )
    text = [b"a"]
    request = _predict_request(signature="greedy", text=text)
    code = INVALID_ARGUMENT
    if kind == "wrong_dtype":
        dtype = rng.choice(["int32", "int64", "float32", "float64", "bool", "uint8"])
        request = _predict_request(text=np.zeros(int(rng.integers(1, 4)), dtype=dtype))
    elif kind == "wrong_rank":
        rank = int(rng.choice([0, 2, 3]))
        request = _predict_request(text=np.full([1] * rank, b"a man", dtype=object))
    elif kind == "empty_strings":
        rows = int(rng.integers(0, 5))
        strings = tf.make_tensor_proto([b""] * rows, dtype=tf.string, shape=[rows])
        request = _predict_request("greedy", text=strings)
        code = OK
    elif kind == "huge_string":
        size = int(rng.integers(10_000, 200_000))
        request = _predict_request("greedy", text=[rng.bytes(size // 2).hex().encode()[:size]])
        code = OK  # TF Serving has no size cap; the export keeps the first 63 tokens
    elif kind == "invalid_utf8":
        blob = rng.bytes(int(rng.integers(1, 12))) + b"\xff\xfe"
        request = _predict_request("greedy", text=[blob])
        code = OK  # the export replaces invalid bytes by U+FFFD
    elif kind == "unknown_alias":
        request = _predict_request(source=[b"a"])
    elif kind == "extra_alias":
        request = _predict_request(text=[b"a"], extra=[b"b"])
    elif kind == "no_inputs":
        request = _predict_request()
    elif kind == "unknown_signature":
        request = _predict_request("no_such_signature", text=text)
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif kind == "unknown_model":
        request = _predict_request(model="no_such_model", text=text)
        code = grpc.StatusCode.NOT_FOUND
    elif kind == "unknown_version":
        request.model_spec.version.value = int(rng.integers(2, 10**9))
        code = grpc.StatusCode.NOT_FOUND
    elif kind == "unknown_output":
        request.output_filter.append("no_such_output")
    elif kind == "unknown_proto_field":
        # Field 1000 is in no TF Serving proto; proto3 parsers keep and ignore it.
        request = _predict_request("greedy", text=[b""])
        extra = b"\xc2\x3e" + bytes([3]) + rng.bytes(3)  # field 1000, length-delimited, 3 bytes
        return kind, request.SerializeToString() + extra, OK
    elif kind == "not_a_proto":
        while True:
            blob = rng.bytes(int(rng.integers(1, 64)))
            try:
                predict_pb2.PredictRequest.FromString(blob)
            except Exception:  # noqa: BLE001 - any decode failure is what is wanted
                break
        # gRPC itself refuses a request it cannot decode, on either server.
        return kind, blob, grpc.StatusCode.INTERNAL
    elif kind == "content_size_mismatch":
        # More rows declared than tensor_content holds: Tensor::FromProto fails.
        request = _predict_request("greedy_ids", source_ids=np.full((1, 3), 3, dtype=np.int32))
        request.inputs["source_ids"].tensor_shape.dim[0].size = int(rng.integers(2, 9))
    elif kind == "negative_dim":
        request.inputs["text"].tensor_shape.dim[0].size = -int(rng.integers(2, 9))
    elif kind == "too_many_rows":
        request = _predict_request(text=[b""] * int(rng.integers(65, 130)))
    elif kind == "ids_out_of_range":
        # The embedding's gather refuses ids >= 300 and, after wrapping negatives, < -300.
        ids = rng.integers(301, 10**6, size=(1, int(rng.integers(2, 6))), dtype=np.int32)
        if rng.random() < 0.5:
            ids = -ids
        ids[0, -1] = 3  # eos
        request = _predict_request("greedy_ids", source_ids=ids)
    elif kind == "ids_wrong_dtype":
        request = _predict_request("greedy_ids", source_ids=np.full((1, 3), 3, dtype=np.float32))
    elif kind == "ids_wrong_rank":
        request = _predict_request("greedy_ids", source_ids=np.full((3,), 3, dtype=np.int32))
    elif kind == "empty_model_name":
        request.model_spec.name = ""
    return kind, request.SerializeToString(), code


def test_a_thousand_malformed_requests_get_tf_servings_codes_and_the_server_goes_on(
    export_base, sentences, expected
):
    config = make_model_server_config({"transformer": export_base})
    params = read_batching_parameters(BATCHING_PARAMETERS_FILE)
    rng = np.random.default_rng(0)
    valid = _predict_request(text=[sentences[0].encode()]).SerializeToString()
    seen = {}
    with (
        devserver.start_server(
            config, workers=8, file_system_poll_wait_seconds=0, batching_parameters=params
        ) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        predict = _raw_predict(channel)
        for number in range(1000):
            kind, data, code = _malformed(rng)
            try:
                predict(data, timeout=60)
                got, details = OK, ""
            except grpc.RpcError as error:
                got, details = error.code(), error.details()
            assert got == code, (number, kind, details)
            seen[kind] = seen.get(kind, 0) + 1
            if number % 100 == 99:
                assert _translation(predict(valid, timeout=60)) == expected[sentences[0]]
        assert _translation(predict(valid, timeout=60)) == expected[sentences[0]]
    assert len(seen) == 21 and min(seen.values()) >= 20, seen
