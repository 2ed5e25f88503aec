"""Server-side batching as `tensorflow_model_server --enable_batching` does it: concurrent requests
to one signature are merged into one model call and the outputs split back per request.

The behaviour, the limits and the status messages are TF Serving's, from:
- tensorflow_serving/batching/batching_session.cc (`BatchingSession`: a queue per signature,
  `MergeInputTensors`, `SplitOutputTensors`, `ProcessBatch`);
- tensorflow_serving/batching/batching_util.{h,cc} (`ComputeTensorBatchSize`, `AddPadding`,
  `RoundToLowestAllowedBatchSize`);
- tensorflow_serving/servables/tensorflow/bundle_factory_util.{h,cc} (`GetQueueOptions`,
  `WrapSessionForBatching`) and saved_model_bundle_factory.cc (every SignatureDef is batched);
- TensorFlow's core/kernels/batching_util/shared_batch_scheduler.h (`Queue::Schedule`,
  `ValidateBatchTaskQueueCapacity`, `IsOpenBatchSchedulable`: the bounded queue and the
  timeout), which TF Serving's batching runs on;
- tensorflow_serving/servables/tensorflow/session_bundle_config.proto (`BatchingParameters`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping

import grpc
import numpy as np
from google.protobuf import text_format

from serving.devserver.errors import ServingError

logger = logging.getLogger(__name__)

# The fields of TF Serving's BatchingParameters (session_bundle_config.proto), by number. The
# proto is not in the tensorflow-serving-api wheel, so its descriptor is rebuilt here and files
# are parsed by protobuf's own text parser, exactly as `ParseProtoTextFile` parses them (an
# unknown or misspelled field is an error, not ignored).
_INT64 = "google.protobuf.Int64Value"
_FIELDS = (
    ("max_batch_size", 1, _INT64),
    ("batch_timeout_micros", 2, _INT64),
    ("max_enqueued_batches", 3, _INT64),
    ("num_batch_threads", 4, _INT64),
    ("thread_pool_name", 5, "google.protobuf.StringValue"),
    ("allowed_batch_sizes", 6, "repeated int64"),
    ("pad_variable_length_inputs", 7, "bool"),
    ("enable_large_batch_splitting", 8, "google.protobuf.BoolValue"),
    ("max_execution_batch_size", 9, _INT64),
)
_PROTO_CLASS = None


def _batching_parameters_proto():
    global _PROTO_CLASS
    if _PROTO_CLASS is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
        file = descriptor_pb2.FileDescriptorProto(
            name="devserver/session_bundle_config.proto",
            package="tensorflow.serving",
            dependency=["google/protobuf/wrappers.proto"],
            syntax="proto3",
        )
        message = file.message_type.add(name="BatchingParameters")
        kinds = descriptor_pb2.FieldDescriptorProto
        for name, number, kind in _FIELDS:
            field = message.field.add(name=name, number=number, json_name=name)
            if kind == "repeated int64":
                field.label, field.type = kinds.LABEL_REPEATED, kinds.TYPE_INT64
            elif kind == "bool":
                field.label, field.type = kinds.LABEL_OPTIONAL, kinds.TYPE_BOOL
            else:
                field.label, field.type = kinds.LABEL_OPTIONAL, kinds.TYPE_MESSAGE
                field.type_name = "." + kind
        pool.Add(file)
        descriptor = pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
        _PROTO_CLASS = message_factory.GetMessageClass(descriptor)
    return _PROTO_CLASS


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's BatchingParameters; a field left out of the file keeps TF Serving's default
    (`SharedBatchScheduler::QueueOptions` and `Options` in shared_batch_scheduler.h).

    Attributes:
        max_batch_size: Most rows in one model call; a request with more rows is refused
            (INVALID_ARGUMENT).
        batch_timeout_micros: How long a partly filled batch waits for more requests.
        max_enqueued_batches: Batches waiting for a batch thread, per signature; a request
            that would need one more gets UNAVAILABLE at once.
        num_batch_threads: Threads running batches, shared by every model and signature.
        allowed_batch_sizes: If set, a batch is padded up to the next size in this list (by
            repeating a row of its last request); the last entry must equal `max_batch_size`.
        pad_variable_length_inputs: Pads inputs of different lengths (dimensions after the
            first) to the longest in the batch, with each tensor's own first element.
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False

    def __post_init__(self):
        # The checks of SharedBatchScheduler::Create/AddQueue (shared_batch_scheduler.h) and
        # CreateBatchingSession (batching_session.cc), with their wording.
        checks = (
            (
                self.num_batch_threads >= 1,
                "num_batch_threads must be positive",
                "num_batch_threads",
            ),
            (self.max_batch_size >= 1, "input_batch_size_limit must be positive", "max_batch_size"),
            (
                self.batch_timeout_micros >= 0,
                "batch_timeout_micros must be non-negative",
                "batch_timeout_micros",
            ),
            (
                self.max_enqueued_batches >= 1,
                "max_enqueued_batches must be positive",
                "max_enqueued_batches",
            ),
        )
        for ok, message, name in checks:
            if not ok:
                raise ValueError(f"{message}; was {getattr(self, name)}")
        sizes = self.allowed_batch_sizes
        if any(later <= earlier for earlier, later in itertools.pairwise(sizes)):
            raise ValueError(
                f"allowed_batch_sizes entries must be monotonically increasing; got {list(sizes)}"
            )
        if sizes and sizes[-1] != self.max_batch_size:
            raise ValueError(
                "Last entry in allowed_batch_sizes must match max_batch_size; last entry was "
                f"{sizes[-1]}; expected {self.max_batch_size}"
            )


def parse_batching_parameters(text: str, source: str = "<string>") -> BatchingParameters:
    """Parses a text-format BatchingParameters (the `--batching_parameters_file` format).

    Raises:
        ValueError: Naming `source`, for text that does not parse, an unknown field, a value
            TF Serving refuses, or large batch splitting (not implemented by the devserver).
    """
    proto = _batching_parameters_proto()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as error:
        raise ValueError(
            f"{source} is not a valid BatchingParameters text proto: {error}"
        ) from None
    if proto.HasField("enable_large_batch_splitting") and proto.enable_large_batch_splitting.value:
        raise ValueError(
            f"{source}: enable_large_batch_splitting is not implemented by the devserver; "
            "remove it or use tensorflow_model_server"
        )
    values = {}
    for name, _, kind in _FIELDS:
        if kind == "repeated int64":
            if getattr(proto, name):
                values[name] = tuple(getattr(proto, name))
        elif kind == "bool":
            values[name] = getattr(proto, name)
        elif name != "enable_large_batch_splitting" and proto.HasField(name):
            values[name] = getattr(proto, name).value
    try:
        return BatchingParameters(**values)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def read_batching_parameters(path: str | os.PathLike) -> BatchingParameters:
    """Reads a `--batching_parameters_file`; see `parse_batching_parameters`."""
    with open(path, encoding="utf-8") as file:
        return parse_batching_parameters(file.read(), os.fspath(path))


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def batch_size_of(inputs: Mapping[str, np.ndarray]) -> int:
    """The rows of a request: the first dimension, which every input must share.

    As `ComputeTensorBatchSize` (tensorflow_serving/batching/batching_util.h).
    """
    if not inputs:
        raise _invalid("Batching Run() must have at least one input tensor")
    sizes = set()
    for array in inputs.values():
        if array.ndim == 0:
            raise _invalid("Batching Run() input tensors must have at least one dimension")
        sizes.add(array.shape[0])
    if len(sizes) != 1:
        raise _invalid("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


class _Task:
    """One request waiting in a queue."""

    __slots__ = ("inputs", "size", "deadline", "done", "outputs", "error")

    def __init__(self, inputs: dict[str, np.ndarray], size: int, deadline: float | None):
        self.inputs = inputs
        self.size = size
        self.deadline = deadline
        self.done = threading.Event()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: ServingError | None = None


class _Batch:
    __slots__ = ("tasks", "size", "opened")

    def __init__(self):
        self.tasks: list[_Task] = []
        self.size = 0
        self.opened = 0.0


class BatchQueue:
    """The queue of one signature (and output set) of one loaded version.

    TF Serving keys its queues by the request's input and output tensor names
    (`TensorSignatureFromRunArgs` in batching_session.cc): a request with an output filter
    that names fewer outputs gets a queue of its own. Created by `BatchScheduler.queue`.
    """

    def __init__(
        self,
        scheduler: BatchScheduler,
        run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
        outputs: tuple[str, ...],
        name: str,
    ):
        self.name = name
        self._scheduler = scheduler
        self._params = scheduler.params
        self._run = run
        self._outputs = outputs
        # The last batch is the open one; the others are closed and wait for a batch thread.
        self._batches: collections.deque[_Batch] = collections.deque([_Batch()])

    # -- called with the scheduler's lock held -----------------------------------------------
    def _enqueue(self, task: _Task, now: float) -> None:
        # Queue::Schedule and ValidateBatchTaskQueueCapacity (shared_batch_scheduler.h).
        limit = self._params.max_batch_size
        if task.size > limit:
            raise _invalid(f"Task size {task.size} is larger than maximum input batch size {limit}")
        if self._batches[-1].size + task.size > limit:
            if len(self._batches) >= self._params.max_enqueued_batches:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE,
                    "The batch scheduling queue to which this task was submitted is full; "
                    f"currently {len(self._batches)} batches enqueued and max_enqueued_batches "
                    f"is {self._params.max_enqueued_batches}",
                )
            self._batches.append(_Batch())
        batch = self._batches[-1]
        if not batch.tasks:
            batch.opened = now
        batch.tasks.append(task)
        batch.size += task.size

    def _open_batch_due(self) -> float | None:
        """When the open batch may run (full, or its timeout), None while it is empty."""
        batch = self._batches[-1]
        if not batch.tasks:
            # TF Serving needs a size above 0; a batch of zero-row requests would never run
            # there, so here it runs like any other.
            return None
        if batch.size >= self._params.max_batch_size:
            return batch.opened
        return batch.opened + self._params.batch_timeout_micros / 1e6

    def _take(self, now: float) -> _Batch | None:
        # Queue::ScheduleBatch: a closed batch first, else the open one once it is due.
        if len(self._batches) >= 2:
            return self._batches.popleft()
        due = self._open_batch_due()
        if due is not None and due <= now:
            batch = self._batches.popleft()
            self._batches.append(_Batch())
            return batch
        return None

    # -- called by request threads -----------------------------------------------------------
    def run(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> dict:
        """Queues one request and blocks until its batch has run.

        Args:
            inputs: Alias to array, validated against the signature.
            timeout: Seconds the caller will wait (its gRPC deadline), None for no limit; a
                request still queued when it passes is not run (see `_process`).

        Returns:
            Output alias to this request's rows of the batch's outputs.

        Raises:
            ServingError: With TF Serving's status for a refused request or a failed batch.
        """
        now = time.monotonic()
        task = _Task(inputs, batch_size_of(inputs), None if timeout is None else now + timeout)
        self._scheduler._submit(self, task, now)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    # -- called by batch threads -------------------------------------------------------------
    def _process(self, batch: _Batch) -> None:
        """Runs one batch and hands every task its rows or the batch's error (ProcessBatch)."""
        try:
            now = time.monotonic()
            if all(task.deadline is not None and task.deadline <= now for task in batch.tasks):
                # batching_session.cc runs a batch if at least one task can still use it.
                raise ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "Run() timeout exceeded while waiting in batching queue",
                )
            merged, padding = self._merge(batch)
            try:
                results = self._run(merged)
            except ServingError:
                raise
            except Exception as error:  # a batch thread must outlive any failure
                logger.exception("batch of %s failed", self.name)
                raise ServingError(
                    grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"
                ) from None
            self._split(batch, results, padding)
        except ServingError as error:
            # Every request of a failed batch gets the batch's status, as in TF Serving.
            for task in batch.tasks:
                task.error = error
        finally:
            for task in batch.tasks:
                task.done.set()

    def _merge(self, batch: _Batch) -> tuple[dict[str, np.ndarray], int]:
        """MergeInputTensors (batching_session.cc): concatenates the tasks' inputs."""
        params = self._params
        padding = _round_to_allowed(params.allowed_batch_sizes, batch.size) - batch.size
        merged = {}
        for alias in batch.tasks[0].inputs:
            arrays = [task.inputs[alias] for task in batch.tasks]
            if params.pad_variable_length_inputs and len({a.ndim for a in arrays}) == 1:
                longest = np.max([array.shape for array in arrays], axis=0)
                arrays = [_pad(array, longest) for array in arrays]
            elif any(array.shape[1:] != arrays[0].shape[1:] for array in arrays):
                raise _failed_precondition(
                    f"Tensors with name '{alias}' from different tasks have different shapes "
                    "and padding is turned off. Set pad_variable_length_inputs to true, or "
                    "ensure that all tensors with the same name have equal dimensions starting "
                    "with the first dim."
                )
            if padding:
                # "Use the first row of this task's tensor as the padding data": the last task.
                arrays.append(np.repeat(arrays[-1][:1], padding, axis=0))
            merged[alias] = np.concatenate(arrays, axis=0)
        return merged, padding

    def _split(self, batch: _Batch, results: Mapping[str, np.ndarray], padding: int) -> None:
        """SplitOutputTensors (batching_session.cc): each task's rows of every output."""
        for task in batch.tasks:
            task.outputs = {}
        for alias in self._outputs:
            value = np.asarray(results[alias])
            if value.ndim == 0:
                raise _failed_precondition("Batched output tensor has 0 dimensions")
            if value.shape[0] != batch.size + padding:
                raise _failed_precondition(
                    "Batched output tensor's 0th dimension does not equal the sum of the 0th "
                    "dimension sizes of the input tensors"
                )
            start = 0
            for task in batch.tasks:
                task.outputs[alias] = value[start : start + task.size]
                start += task.size


def _round_to_allowed(allowed: tuple[int, ...], size: int) -> int:
    """RoundToLowestAllowedBatchSize (batching_util.cc)."""
    return next((allowed_size for allowed_size in allowed if allowed_size >= size), size)


def _pad(array: np.ndarray, shape) -> np.ndarray:
    """AddPadding (batching_util.cc): pads every dimension after the first at the end, with the
    tensor's first element ("using existing values in padding"), not with zero."""
    widths = [(0, 0)] + [
        (0, int(want) - have) for want, have in zip(shape[1:], array.shape[1:], strict=True)
    ]
    if not any(after for _, after in widths):
        return array
    if array.size == 0:
        raise _invalid("Got empty tensor in batch of non-empty tensors.")
    return np.pad(array, widths, mode="constant", constant_values=array.flat[0])


class BatchScheduler:
    """TF Serving's shared batch scheduler: `num_batch_threads` threads run the due batches of
    every queue, visiting the queues in turn.

    Queues are created per loaded version and signature on first use (`queue`) and dropped
    with the version.

    Args:
        params: The parsed batching parameters.
    """

    def __init__(self, params: BatchingParameters):
        self.params = params
        self._cond = threading.Condition()
        self._stopping = False
        # Loaded version -> (signature, outputs) -> queue; weak, so an unloaded version's
        # queues go with it (its in-flight requests hold it until they finish).
        self._queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._turn = 0
        # Batches run and the requests in them (the mean batch size a load test reports).
        self.batches_run = 0
        self.requests_run = 0
        self._threads = [
            threading.Thread(
                target=self._work, name=f"{params.thread_pool_name}-{index}", daemon=True
            )
            for index in range(params.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def queue(
        self,
        owner: object,
        key: tuple,
        run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
        outputs: tuple[str, ...],
        name: str,
    ) -> BatchQueue:
        """The queue of `owner` (a loaded version) for `key`, made with `run` on first use.

        `run` must not hold a reference to `owner`, or the queue would keep it loaded.
        """
        with self._cond:
            queues = self._queues.setdefault(owner, {})
            if key not in queues:
                queues[key] = BatchQueue(self, run, outputs, name)
            return queues[key]

    def _all_queues(self) -> list[BatchQueue]:
        return [queue for queues in list(self._queues.values()) for queue in queues.values()]

    def _submit(self, queue: BatchQueue, task: _Task, now: float) -> None:
        with self._cond:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            queue._enqueue(task, now)
            self._cond.notify()

    def _next(self) -> tuple[BatchQueue, _Batch] | None | float:
        """A due batch, else the seconds until the next one is due (None: nothing waits)."""
        # Stopping closes every open batch, as `closed_` does in IsOpenBatchSchedulable.
        now = math.inf if self._stopping else time.monotonic()
        queues = self._all_queues()
        wait = None
        for offset in range(len(queues)):
            queue = queues[(self._turn + offset) % len(queues)]
            batch = queue._take(now)
            if batch is not None:
                self._turn = (self._turn + offset + 1) % len(queues)
                return queue, batch
            due = queue._open_batch_due()
            if due is not None:
                wait = due - now if wait is None else min(wait, due - now)
        return wait

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    found = self._next()
                    if isinstance(found, tuple):
                        break
                    if self._stopping:
                        return
                    self._cond.wait(found)
                self.batches_run += 1
                self.requests_run += len(found[1].tasks)
                # Another thread may find a further due batch while this one runs.
                self._cond.notify()
            queue, batch = found
            queue._process(batch)

    def stop(self) -> None:
        """Runs what is queued, refuses new requests (UNAVAILABLE) and ends the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
