"""Server-side batching of the devserver (`--enable_batching`), as TF Serving's: parameters
parsed as TF Serving parses them, concurrent requests merged and split back, the bounded queue,
padding, deadlines; and the exported translator under it, the `*_ids` signatures included.

The scheduler tests use a numpy "model" and events, so they are exact about what is merged;
the end-to-end tests serve the tiny trained export over gRPC.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from model_server import BATCHING_PARAMETERS_FILE, MAX_BATCH_SIZE
from tiny_run import tiny_export, tiny_model_dir

from keras_transformer.translation import model_dir as layout
from serving import devserver
from serving.client import TranslationClient
from serving.devserver.batching import (
    BatchingParameters,
    BatchScheduler,
    parse_batching_parameters,
    read_batching_parameters,
)
from serving.devserver.errors import ServingError
from serving.model_config import make_model_server_config

# -- parameters ------------------------------------------------------------------------------


def test_the_shipped_parameters_parse():
    params = read_batching_parameters(BATCHING_PARAMETERS_FILE)
    assert params.max_batch_size == MAX_BATCH_SIZE == 64
    assert params.batch_timeout_micros == 5000
    assert params.max_enqueued_batches == 100
    assert params.num_batch_threads == 4
    # The *_ids signatures are safe only with padding on (see test_ids_signatures_*).
    assert params.pad_variable_length_inputs is True
    assert params.allowed_batch_sizes == ()


def test_left_out_fields_keep_tf_servings_defaults():
    params = parse_batching_parameters("max_batch_size { value: 8 }")
    # SharedBatchScheduler::QueueOptions (TensorFlow's shared_batch_scheduler.h).
    assert (params.max_batch_size, params.batch_timeout_micros, params.max_enqueued_batches) == (
        8,
        0,
        10,
    )
    assert params.num_batch_threads >= 1 and params.pad_variable_length_inputs is False


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_batch_sise { value: 8 }", 'no field named "max_batch_sise"'),
        ("max_batch_size: 8", "max_batch_size"),  # a wrapper message, not a scalar
        ("max_batch_size { value: 0 }", "input_batch_size_limit must be positive; was 0"),
        ("max_enqueued_batches { value: 0 }", "max_enqueued_batches must be positive; was 0"),
        ("num_batch_threads { value: 0 }", "num_batch_threads must be positive; was 0"),
        ("batch_timeout_micros { value: -1 }", "batch_timeout_micros must be non-negative"),
        (
            "max_batch_size { value: 8 } allowed_batch_sizes: 2 allowed_batch_sizes: 4",
            "Last entry in allowed_batch_sizes must match max_batch_size; last entry was 4; "
            "expected 8",
        ),
        (
            "max_batch_size { value: 4 } allowed_batch_sizes: 4 allowed_batch_sizes: 4",
            "must be monotonically increasing",
        ),
        ("enable_large_batch_splitting { value: true }", "not implemented by the devserver"),
    ],
)
def test_bad_parameters_are_refused_naming_the_problem(text, fragment):
    with pytest.raises(ValueError, match="my.txt") as info:
        parse_batching_parameters(text, "my.txt")
    assert fragment in str(info.value)


def test_the_command_refuses_a_parameters_file_without_enable_batching(capsys):
    argv = ["--model_base_path", "/nonexistent", "--batching_parameters_file", "x.txt"]
    assert devserver.main(argv) == 1
    # The wording of Server::BuildAndStart (tensorflow_serving/model_servers/server.cc).
    assert "batching_parameters_file is set without setting" in capsys.readouterr().err


# -- the scheduler, with a numpy model -------------------------------------------------------


class _Owner:
    """Stands for a loaded version (queues are kept per version)."""


class _Model:
    """`y = row sums of x`; records every merged input; can be held to fill the queue."""

    def __init__(self, hold=False):
        self.inputs = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, inputs):
        self.inputs.append(inputs["x"].copy())
        self.started.set()
        self.release.wait(10)
        x = inputs["x"]
        return {"y": x.reshape(len(x), -1).sum(axis=1)}


@pytest.fixture
def scheduler_for():
    schedulers = []

    def make(model, **params):
        scheduler = BatchScheduler(BatchingParameters(**params))
        schedulers.append(scheduler)
        return scheduler.queue(_owner, ("sig", ("y",)), model, ("y",), "test/1/sig")

    _owner = _Owner()
    yield make
    for scheduler in schedulers:
        scheduler.stop()


def _concurrently(calls):
    """Runs the callables at once; their results, or the exceptions they raised."""
    with futures.ThreadPoolExecutor(len(calls)) as pool:
        jobs = [pool.submit(call) for call in calls]
        return [job.exception() or job.result() for job in jobs]


def test_concurrent_requests_are_merged_into_one_call_and_split_back(scheduler_for):
    model = _Model()
    # A full batch runs at once; the long timeout would otherwise hold a partial one.
    queue = scheduler_for(model, max_batch_size=6, batch_timeout_micros=10_000_000)
    requests = [np.full((rows, 2), rows) for rows in (1, 2, 3)]
    results = _concurrently([lambda x=x: queue.run({"x": x}) for x in requests])
    assert [r["y"].tolist() for r in results] == [[2], [4, 4], [6, 6, 6]]
    assert len(model.inputs) == 1 and model.inputs[0].shape == (6, 2)


def test_a_partial_batch_runs_after_the_timeout(scheduler_for):
    model = _Model()
    queue = scheduler_for(model, max_batch_size=64, batch_timeout_micros=200_000)
    started = time.monotonic()
    assert queue.run({"x": np.ones((1, 3))})["y"].tolist() == [3]
    assert 0.19 <= time.monotonic() - started < 5
    assert len(model.inputs) == 1


def test_a_full_queue_answers_unavailable_at_once(scheduler_for):
    model = _Model(hold=True)
    queue = scheduler_for(model, max_batch_size=1, max_enqueued_batches=1, num_batch_threads=1)
    with futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(queue.run, {"x": np.ones((1, 1))})
        assert model.started.wait(10)  # the only batch thread is busy with it
        queued = pool.submit(queue.run, {"x": np.full((1, 1), 2)})
        time.sleep(0.2)
        with pytest.raises(ServingError) as info:
            queue.run({"x": np.full((1, 1), 3)})
        model.release.set()
        assert running.result(10)["y"].tolist() == [1]
        assert queued.result(10)["y"].tolist() == [2]
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.message == (
        "The batch scheduling queue to which this task was submitted is full; currently 1 "
        "batches enqueued and max_enqueued_batches is 1"
    )
    # The queue drained: the next request is answered.
    assert queue.run({"x": np.full((1, 1), 4)})["y"].tolist() == [4]


def test_a_request_over_max_batch_size_is_invalid_argument(scheduler_for):
    queue = scheduler_for(_Model(), max_batch_size=2)
    with pytest.raises(ServingError) as info:
        queue.run({"x": np.ones((3, 1))})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == "Task size 3 is larger than maximum input batch size 2"


def test_without_padding_different_lengths_fail_the_whole_batch(scheduler_for):
    model = _Model()
    queue = scheduler_for(model, max_batch_size=3, batch_timeout_micros=10_000_000)
    lengths = (2, 2, 5)
    results = _concurrently([lambda n=n: queue.run({"x": np.ones((1, n))}) for n in lengths])
    assert all(isinstance(result, ServingError) for result in results)
    assert {r.code for r in results} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert "different shapes and padding is turned off" in results[0].message
    assert model.inputs == []


def test_with_padding_rows_are_padded_with_the_tensors_first_element(scheduler_for):
    model = _Model()
    queue = scheduler_for(
        model, max_batch_size=2, batch_timeout_micros=10_000_000, pad_variable_length_inputs=True
    )
    short, long = np.array([[7, 3]]), np.array([[5, 6, 9, 3]])
    results = _concurrently([lambda: queue.run({"x": short}), lambda: queue.run({"x": long})])
    (merged,) = model.inputs
    # AddPadding (batching_util.cc) pads with input.flat(0), here 7: not with 0.
    expected = {(7, 3, 7, 7), (5, 6, 9, 3)}
    assert {tuple(row) for row in merged.tolist()} == expected
    assert results[0]["y"].tolist() == [24] and results[1]["y"].tolist() == [23]


def test_allowed_batch_sizes_pad_the_batch_with_a_row_of_its_last_request(scheduler_for):
    model = _Model()
    queue = scheduler_for(
        model, max_batch_size=4, allowed_batch_sizes=(2, 4), batch_timeout_micros=300_000
    )
    results = _concurrently(
        [lambda: queue.run({"x": np.full((2, 1), 1)}), lambda: queue.run({"x": np.full((1, 1), 2)})]
    )
    (merged,) = model.inputs
    assert merged.shape == (4, 1)  # 3 rows rounded up to the allowed 4
    assert sorted(merged.ravel().tolist()) in ([1, 1, 2, 2], [1, 1, 1, 2])
    assert results[0]["y"].tolist() == [1, 1] and results[1]["y"].tolist() == [2]


def test_a_request_past_its_deadline_in_the_queue_is_not_run(scheduler_for):
    model = _Model(hold=True)
    queue = scheduler_for(model, max_batch_size=1, num_batch_threads=1)
    with futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(queue.run, {"x": np.ones((1, 1))})
        assert model.started.wait(10)
        late = pool.submit(queue.run, {"x": np.ones((1, 1))}, 0.05)  # 50 ms left
        time.sleep(0.3)
        model.release.set()
        running.result(10)
    error = late.exception(10)
    assert isinstance(error, ServingError)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message == "Run() timeout exceeded while waiting in batching queue"
    assert len(model.inputs) == 1


def test_a_failed_batch_fails_every_request_in_it_and_the_queue_goes_on(scheduler_for):
    calls = []

    def model(inputs):
        calls.append(len(inputs["x"]))
        if len(calls) == 1:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "indices[3] = 999 is not in [0, 300)"
            )
        return {"y": inputs["x"][:, 0]}

    queue = scheduler_for(model, max_batch_size=2, batch_timeout_micros=10_000_000)
    results = _concurrently([lambda: queue.run({"x": np.ones((1, 1))})] * 2)
    assert [r.message for r in results] == ["indices[3] = 999 is not in [0, 300)"] * 2
    assert calls == [2]
    assert queue.run({"x": np.full((2, 1), 5)})["y"].tolist() == [5, 5]


def test_an_output_without_batch_dimension_is_refused(scheduler_for):
    queue = scheduler_for(lambda inputs: {"y": np.float32(1.0)}, max_batch_size=2)
    with pytest.raises(ServingError) as info:
        queue.run({"x": np.ones((1, 1))})
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.message == "Batched output tensor has 0 dimensions"


# -- the exported translator, served with batching -------------------------------------------


@pytest.fixture(scope="module")
def translator(tmp_path_factory, shared_data_dir):
    translator, _ = layout.load_translator(tiny_model_dir(tmp_path_factory, shared_data_dir))
    return translator


@pytest.fixture(scope="module")
def unbatched(tmp_path_factory, shared_data_dir):
    """The export's signatures in this process: the answers without batching."""
    import tensorflow_text  # noqa: F401 - the export's SentencePiece ops

    export = tiny_export(tmp_path_factory, shared_data_dir) / "1"
    return tf.saved_model.load(str(export)).signatures


@pytest.fixture(scope="module")
def sentences(shared_data_dir):
    lines = (shared_data_dir / "multi30k" / "test_2016_flickr.en").read_text().splitlines()
    return lines[:8]


@pytest.fixture
def serve_batched(tmp_path_factory, shared_data_dir):
    """`serve(**batching_parameters)` -> a devserver on the tiny export, with batching."""
    servers = []

    def serve(**params):
        base = tiny_export(tmp_path_factory, shared_data_dir)
        server = devserver.start_server(
            make_model_server_config({"transformer": base}),
            workers=16,
            file_system_poll_wait_seconds=0,
            batching_parameters=BatchingParameters(**params),
        )
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()


def test_concurrent_translations_are_batched_and_each_gets_its_own(
    serve_batched, unbatched, sentences
):
    server = serve_batched(max_batch_size=8, batch_timeout_micros=10_000_000, num_batch_threads=1)
    with TranslationClient(server.address, timeout=60) as client:
        results = _concurrently([lambda s=s: client.translate([s]) for s in sentences])
    expected = [
        unbatched["serving_default"](text=tf.constant([s]))["translations"].numpy()[0].decode()
        for s in sentences
    ]
    assert [result[0] for result in results] == expected
    assert len(set(expected)) > 1  # different answers, so a mix-up would show
    # All eight went through one model call (the batch was full, not timed out).
    assert (server.batching.batches_run, server.batching.requests_run) == (1, 8)


def _until_eos(row, eos_id, pad_id=0):
    """A row's tokens through eos; a row that never reached eos (it stopped at its maximum
    length) without the padding that fills it to the batch's width."""
    row = list(row)
    if eos_id in row:
        return row[: row.index(eos_id) + 1]
    while row and row[-1] == pad_id:
        row.pop()
    return row


@pytest.mark.parametrize("signature", ["greedy_ids", "beam_ids"])
def test_ids_signatures_of_different_lengths_are_safe_in_one_batch(
    serve_batched, translator, unbatched, sentences, signature
):
    """The decision for the `*_ids` signatures (serving/OPERATIONS.md): TF Serving batches them
    like every signature, so they are made safe: the shipped file pads (different lengths
    would otherwise fail together) and the signatures read what follows eos as padding (TF
    Serving pads with the tensor's first element, a real token)."""
    shipped = read_batching_parameters(BATCHING_PARAMETERS_FILE)
    server = serve_batched(
        max_batch_size=4,
        batch_timeout_micros=10_000_000,
        num_batch_threads=1,
        pad_variable_length_inputs=shipped.pad_variable_length_inputs,
    )
    requests = []
    for sentence in sentences[:4]:
        source_ids, _, _ = translator.encode(tf.constant([sentence]))
        requests.append(source_ids.numpy())
    assert len({ids.shape[1] for ids in requests}) >= 3  # lengths differ within the batch
    assert all(ids[0, 0] != translator.model.config.pad_id for ids in requests)
    eos, pad = translator.model.config.eos_id, translator.model.config.pad_id
    expected = [
        _until_eos(unbatched[signature](source_ids=ids)["target_ids"].numpy()[0], eos, pad)
        for ids in requests
    ]
    with TranslationClient(server.address, timeout=60) as client:
        results = _concurrently(
            [lambda ids=ids: client.predict({"source_ids": ids}, signature) for ids in requests]
        )
    assert [_until_eos(result["target_ids"][0], eos, pad) for result in results] == expected
    assert (server.batching.batches_run, server.batching.requests_run) == (1, 4)


def test_ids_signatures_without_padding_fail_together(serve_batched, translator, sentences):
    server = serve_batched(max_batch_size=2, batch_timeout_micros=10_000_000, num_batch_threads=1)
    requests = [translator.encode(tf.constant([s]))[0].numpy() for s in sentences[:2]]
    assert requests[0].shape != requests[1].shape
    with TranslationClient(server.address, timeout=60) as client:
        results = _concurrently(
            [lambda ids=ids: client.predict({"source_ids": ids}, "greedy_ids") for ids in requests]
        )
    assert [result.code for result in results] == [grpc.StatusCode.FAILED_PRECONDITION] * 2
