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
# Seconds before a killed process' peer gives up (JAX's default is 100).
HEARTBEAT = 15
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
        command += ["--process-id", str(process_id), "--heartbeat-timeout", str(HEARTBEAT)]
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
    """Runs both processes to their end; their `(output, summary)`."""
    port = _free_port()
    processes = [
        _start(model_dir, steps, *extra, group=(port, i), devices=devices) for i in range(2)
    ]
    return [_finish(process) for process in processes]


def _losses(model_dir):
    """`(step, loss)` of every progress line, in order."""
    lines = (model_dir / layout.PROGRESS).read_text().splitlines()
    return [(entry["step"], entry["loss"]) for entry in map(json.loads, lines)]


def _logits(model_dir, weights, data_dir):
    """The logits of `weights` for a few Multi30k validation pairs (teacher forcing)."""
    from keras_transformer.translation.model_dir import load_tokenizer, load_transformer

    tokenizer = load_tokenizer(model_dir)
    sources = (data_dir / "multi30k/val.en").read_text().splitlines()[:4]
    targets = (data_dir / "multi30k/val.de").read_text().splitlines()[:4]
    source_ids = tokenizer.tokenize(sources).to_tensor().numpy()
    target_ids = tokenizer.tokenize(targets).to_tensor().numpy()[:, :12]
    model, _ = load_transformer(model_dir, str(weights))
    return np.asarray(model({"source_ids": source_ids, "target_ids": target_ids}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes of two devices each train to step 20 with dev BLEU at 20; process 1 is
    SIGKILLed after the step-10 save and both are started again. One process of one device
    trains to step 10 on the same global batches."""
    base = tmp_path_factory.mktemp("multi_process")
    two = base / "two"
    extra = ("train.eval_every_steps=20",)
    port = _free_port()
    first = [_start(two, 20, *extra, group=(port, i), devices=2) for i in range(2)]
    saved = layout.step_checkpoint(two, 10)
    deadline = time.monotonic() + 600
    while not saved.exists() and first[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert saved.exists(), first[0].communicate()[0][-3000:]
    first[1].send_signal(signal.SIGKILL)
    first[1].wait()
    killed = time.monotonic()
    try:
        first[0].wait(timeout=120)
        survivor = {"returncode": first[0].returncode, "seconds": time.monotonic() - killed}
    except subprocess.TimeoutExpired:
        first[0].send_signal(signal.SIGKILL)
        survivor = {"returncode": None, "seconds": None}
    survivor["output"] = first[0].communicate()[0]
    resumed = _two_processes(two, 20, *extra, devices=2)
    one = _finish(_start(base / "one", 10))
    return {"base": base, "survivor": survivor, "resumed": resumed, "one": one}


def test_two_processes_hold_identical_weights_and_only_process_0_writes(runs):
    (out0, summary0), (out1, summary1) = runs["resumed"]
    for summary, process_id in ((summary0, 0), (summary1, 1)):
        assert summary["process_id"] == process_id
        assert (summary["devices"], summary["processes"], summary["steps"]) == (4, 2, 20)
    assert summary0["weights_digest"] == summary1["weights_digest"]
    # Process 0 speaks and writes; the other prints its summary only.
    assert "step      20/20" in out0 and "step " not in out1 and "dev BLEU" not in out1
    # One line per logged step, across the kill: a second writer would have added its own.
    assert [step for step, _ in _losses(runs["base"] / "two")] == [5, 10, 15, 20]


def test_two_processes_train_as_one_process_on_the_global_batch(runs, shared_data_dir):
    base = runs["base"]
    assert runs["one"][1]["devices"] == 1 and "process_id" not in runs["one"][1]
    two, one = dict(_losses(base / "two")), dict(_losses(base / "one"))
    assert sorted(one) == [5, 10]
    for step in one:
        np.testing.assert_allclose(two[step], one[step], rtol=LOSS_RTOL, err_msg=f"step {step}")
    # The trained functions agree (weights can not be compared one by one: a key projection's
    # bias has a zero gradient, so Adam turns its rounding noise into full-size steps).
    np.testing.assert_allclose(
        _logits(base / "two", layout.step_checkpoint(base / "two", 10), shared_data_dir),
        _logits(base / "one", layout.step_checkpoint(base / "one", 10), shared_data_dir),
        atol=LOGITS_ATOL,
        rtol=0,
    )


def test_a_killed_process_stops_the_job_and_both_resume_from_the_backup(runs):
    survivor = runs["survivor"]
    # The other process fails on its own (the coordination service misses the dead one's
    # heartbeats) instead of waiting forever.
    assert survivor["returncode"] not in (None, 0), survivor["output"][-3000:]
    assert survivor["seconds"] < HEARTBEAT + 60, survivor
    model_dir = runs["base"] / "two"
    out0 = runs["resumed"][0][0]
    resumed_steps = [
        int(line.split()[1].split("/")[0]) for line in out0.splitlines() if line.startswith("step ")
    ]
    assert resumed_steps == [15, 20], out0[-3000:]
    history = [
        json.loads(line) for line in (model_dir / layout.EVAL_HISTORY).read_text().splitlines()
    ]
    assert [entry["step"] for entry in history] == [20]
    assert (model_dir / layout.COMPLETE).is_file() and (model_dir / layout.BEST).is_file()
