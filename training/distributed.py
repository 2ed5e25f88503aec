"""Data parallel and multi-host training on the JAX backend.

One SPMD program runs on every device of every process (`keras.distribution.DataParallel`):
the variables are replicated, each global batch is split by rows across the devices, and the
loss and gradients are those of the whole global batch. Hosts join with `jax.distributed`
(`--coordinator HOST:PORT --num-processes N --process-id I`, or `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`).

Why `MultiWorkerMirroredStrategy` is not used: with Keras 3 `model.fit` it fails
("unsupported type PerReplica", keras-team/keras issue 20585; see `../shared/NOTES.md`).

Data: every process builds the same global batch stream (same corpus, seed and buckets) and
feeds only its own block of rows of each batch (`process_rows`). All processes therefore step
through the same batch shape at the same step, which `jax.make_array_from_process_local_data`
needs (one program per shape, run by every process), and the global batch is exactly the batch
one process would train on. The cost is that each process tokenizes the whole corpus, which is
cheap next to training.

Files: the model directory must be one that every process reads (a shared filesystem): all
processes restore the backup from it; only process 0 writes it (checkpoints, logs, BLEU, the
completion marker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path


class DistributedError(ValueError):
    """A bad process-group setting (flags or `JAX_*` environment variables)."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits among the training processes.

    Attributes:
        coordinator: `HOST:PORT` of process 0's coordination service; `None` for one process.
        num_processes: processes in the job (one per host, each driving its local devices).
        process_id: this process' index, `0 .. num_processes - 1`; 0 writes the model dir.
        heartbeat_timeout: seconds without a heartbeat after which a process counts as dead
            and the others stop (`jax.distributed.initialize`'s argument).
    """

    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    heartbeat_timeout: int = 100

    @property
    def is_chief(self) -> bool:
        return self.process_id == 0

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _int_setting(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def process_group(
    coordinator=None, num_processes=None, process_id=None, heartbeat_timeout=100, environ=None
):
    """The process group from flags, falling back to the `JAX_*` environment variables.

    Raises:
        DistributedError: when the settings are incomplete or out of range, naming the value.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    if num_processes is None and environ.get(ENV_NUM_PROCESSES):
        num_processes = _int_setting(ENV_NUM_PROCESSES, environ[ENV_NUM_PROCESSES])
    if process_id is None and environ.get(ENV_PROCESS_ID):
        process_id = _int_setting(ENV_PROCESS_ID, environ[ENV_PROCESS_ID])
    if coordinator is None and num_processes in (None, 1) and process_id in (None, 0):
        return ProcessGroup()
    if isinstance(heartbeat_timeout, bool) or int(heartbeat_timeout) < 1:
        raise DistributedError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_timeout}")
    missing = [
        name
        for name, value in (
            ("--coordinator", coordinator),
            ("--num-processes", num_processes),
            ("--process-id", process_id),
        )
        if value is None
    ]
    if missing:
        raise DistributedError(
            f"a multi-process run needs --coordinator, --num-processes and --process-id "
            f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing "
            + ", ".join(missing)
        )
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    num_processes = _int_setting("--num-processes", num_processes)
    process_id = _int_setting("--process-id", process_id)
    if num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process-id must be in 0..{num_processes - 1} for --num-processes "
            f"{num_processes}, got {process_id}"
        )
    return ProcessGroup(str(coordinator), num_processes, process_id, int(heartbeat_timeout))


def initialize(group: ProcessGroup) -> None:
    """Joins the JAX process group (before any JAX computation) and checks the backend.

    On CPU, collectives across processes need gloo (XLA's default CPU collectives are
    in-process only).
    """
    import keras

    if not group.multi_process:
        return
    if keras.config.backend() != "jax":
        raise DistributedError(
            "multi-process training runs on the JAX backend (set KERAS_BACKEND=jax); "
            f"got {keras.config.backend()!r}"
        )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=group.coordinator,
        num_processes=group.num_processes,
        process_id=group.process_id,
        heartbeat_timeout_seconds=group.heartbeat_timeout,
    )


def data_parallel_devices() -> int:
    """Sets `DataParallel` over every device of every process when there is more than one;
    returns the number of devices (1 on TensorFlow, where `train.strategy` decides)."""
    import keras

    if keras.config.backend() != "jax":
        return 1
    import jax

    devices = jax.devices()
    if len(devices) > 1:
        keras.distribution.set_distribution(
            # Each process feeds its own rows (process_rows), so Keras must not shard again.
            keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        )
    return len(devices)


def process_rows(dataset, group: ProcessGroup):
    """This process' block of rows of every global batch (see the module docstring)."""
    if not group.multi_process:
        return dataset
    count, index = group.num_processes, group.process_id

    def rows(features, labels):
        import tensorflow as tf

        size = tf.shape(labels)[0] // count
        begin, end = index * size, (index + 1) * size
        return {name: ids[begin:end] for name, ids in features.items()}, labels[begin:end]

    return dataset.map(rows)


def agree(value: bool, group: ProcessGroup) -> bool:
    """Process 0's `value` in every process: decisions taken from a clock (the time budget)
    must be the same everywhere, or one process stops while the others wait for it."""
    return bool(from_chief(float(bool(value)), group))


def from_chief(value: float, group: ProcessGroup) -> float:
    """Process 0's `value` (a number) in every process: a quantity computed from a clock (the
    cooldown's progress) must be the same everywhere, or the replicas train differently."""
    if not group.multi_process:
        return float(value)
    import numpy as np
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.asarray(float(value), np.float32)))


def barrier(name: str, group: ProcessGroup) -> None:
    """Waits until every process reaches `name` (e.g. for process 0 to write the vocabulary)."""
    if group.multi_process:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def local_variables():
    """No distribution while Keras saves: its save creates a throwaway optimizer (to list the
    attributes it skips), and a variable created under `DataParallel` is placed on every
    device of every process, a collective that a process saving alone would wait on forever.
    Reading the replicated weights needs no other process."""
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def save_weights(model, path, writes: bool = True) -> None:
    """`model.save_weights(path)` in process 0; the same save into a scratch file elsewhere.

    Saving runs no cross-process computation (`local_variables`), and every process still
    saves at the same points, so the processes never depend on which of them keeps the file.
    """
    with local_variables():
        if writes:
            model.save_weights(path)
            return
        with tempfile.TemporaryDirectory(prefix="kt-scratch-") as scratch:
            model.save_weights(Path(scratch) / Path(path).name)


def scratch_dir(path, writes: bool):
    """`path` in process 0; elsewhere a fresh temporary directory for output nobody reads
    (e.g. the TensorBoard callback, which every process must run; see `save_weights`)."""
    return str(path) if writes else tempfile.mkdtemp(prefix="kt-scratch-")


def weights_digest(model) -> str:
    """SHA-256 of the model's weights: equal in every process of a data-parallel run."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()[:16]
