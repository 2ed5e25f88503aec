"""Two training processes on localhost (JAX, CPU, gloo) against one: `training.distributed`.

Each of the two processes drives two CPU devices (XLA's forced host device count), so the run
is data parallel over 4 devices in 2 processes: every global batch is split by rows across
processes and then across each process' devices. One process with one device trains on the
same global batches alone.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keras_transformer.translation import model_dir as layout

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "training" / "configs" / "tiny.yaml"
# Two bucket shapes (24 and 48) keep the XLA compilations few; no dev BLEU unless asked. 384
# tokens make 16x24 and 8x48 batches: rows that 1, 2 and 4 devices divide, so every device
# count trains on the same global batches.
COMMON = (
    "data.length_multiple=24",
    "data.batch_tokens=384",
    "train.steps_per_epoch=10",
    "train.log_every_steps=5",
    "train.save_every_steps=10",
    "train.eval_every_steps=0",
)
# One process against two: the same global batches, summed in a different order (per device,
# then across processes), so float32 results differ by rounding only.
LOSS_RTOL = 1e-4
LOGITS_ATOL = 1e-3


def _free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _command(model_dir, steps, *extra, group=None):
    sets = [f"train.model_dir={model_dir}", f"train.max_steps={steps}", *COMMON, *extra]
    command = [sys.executable, "-m", "training.train", "--config", str(TINY)]
    command += [arg for item in sets for arg in ("--set", item)]
    if group is not None:
        port, process_id = group
        command += ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
        command += ["--process-id", str(process_id)]
    return command


def _env(devices=1):
    return dict(
        os.environ,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(ROOT),
    )


def _start(model_dir, steps, *extra, group=None, devices=1):
    return subprocess.Popen(
        _command(model_dir, steps, *extra, group=group),
        cwd=ROOT,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process, timeout=600):
    output = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, output[-4000:]
    return output, json.loads(output.strip().splitlines()[-1])


def _two_processes(model_dir, steps, *extra, devices=1):
    port = _free_port()
    processes = [
        _start(model_dir, steps, *extra, group=(port, i), devices=devices) for i in range(2)
    ]
    return [_finish(process) for process in processes]


def _losses(model_dir):
    lines = (model_dir / layout.PROGRESS).read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def _logits(model_dir, data_dir):
    """The final model's logits for a few Multi30k validation pairs (teacher forcing)."""
    from keras_transformer.translation.model_dir import load_tokenizer, load_transformer

    tokenizer = load_tokenizer(model_dir)
    sources = (data_dir / "multi30k/val.en").read_text().splitlines()[:4]
    targets = (data_dir / "multi30k/val.de").read_text().splitlines()[:4]
    source_ids = tokenizer.tokenize(sources).to_tensor().numpy()
    target_ids = tokenizer.tokenize(targets).to_tensor().numpy()[:, :12]
    model, _ = load_transformer(model_dir, "final")
    return np.asarray(model({"source_ids": source_ids, "target_ids": target_ids}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multi_process")
    two = _two_processes(base / "two", 10, devices=2)
    one = _finish(_start(base / "one", 10))
    return base, two, one


def test_two_processes_hold_identical_weights(runs):
    base, ((out0, summary0), (out1, summary1)), _ = runs
    for summary, process_id in ((summary0, 0), (summary1, 1)):
        assert summary["process_id"] == process_id
        assert (summary["devices"], summary["processes"], summary["steps"]) == (4, 2, 10)
    assert summary0["weights_digest"] == summary1["weights_digest"]
    # Process 0 speaks and writes; the other prints its summary only.
    assert "step      10/10" in out0 and "step " not in out1
    # One line per logged step: a second writer would have appended its own.
    assert sorted(_losses(base / "two")) == [5, 10]


def test_two_processes_train_as_one_process_on_the_global_batch(runs, shared_data_dir):
    base, _, (_, one_summary) = runs
    assert one_summary["devices"] == 1 and "process_id" not in one_summary
    two, one = _losses(base / "two"), _losses(base / "one")
    assert sorted(two) == sorted(one) == [5, 10]
    for step in one:
        np.testing.assert_allclose(two[step], one[step], rtol=LOSS_RTOL, err_msg=f"step {step}")
    # The trained functions agree (weights can not be compared one by one: a key projection's
    # bias has a zero gradient, so Adam turns its rounding noise into full-size steps).
    np.testing.assert_allclose(
        _logits(base / "two", shared_data_dir),
        _logits(base / "one", shared_data_dir),
        atol=LOGITS_ATOL,
        rtol=0,
    )


def test_a_killed_process_costs_only_the_steps_since_the_last_backup(tmp_path):
    """SIGKILL one process after the step-10 backup; the job fails (the other process stops
    too, or is stopped as a scheduler would); started again, both resume from the backup,
    evaluate dev BLEU together and finish with identical weights."""
    model_dir = tmp_path / "run"
    port = _free_port()
    extra = ("train.eval_every_steps=20",)
    first = [_start(model_dir, 20, *extra, group=(port, i)) for i in range(2)]
    metadata = model_dir / layout.BACKUP / "training_metadata.json"
    deadline = time.monotonic() + 300
    while not metadata.exists() and first[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metadata.exists(), first[0].communicate()[0][-3000:]
    first[1].send_signal(signal.SIGKILL)
    first[1].wait()
    try:
        first[0].wait(timeout=30)
    except subprocess.TimeoutExpired:
        first[0].send_signal(signal.SIGKILL)
    first_output = first[0].communicate()[0]
    assert not (model_dir / layout.COMPLETE).exists(), first_output[-3000:]

    (out0, summary0), (_, summary1) = _two_processes(model_dir, 20, *extra)
    assert summary0["steps"] == summary1["steps"] == 20
    assert summary0["weights_digest"] == summary1["weights_digest"]
    resumed_steps = [
        int(line.split()[1].split("/")[0]) for line in out0.splitlines() if line.startswith("step ")
    ]
    assert resumed_steps and min(resumed_steps) > 10, out0[-3000:]
    history = (model_dir / layout.EVAL_HISTORY).read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [20]
    assert (model_dir / layout.COMPLETE).is_file() and (model_dir / layout.BEST).is_file()
