"""`benchmarks/serving_load.py` runs end to end on the tiny export: a devserver process with
batching, two clients for a second, the in-process reference, the JSON and the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_run import tiny_export

ROOT = Path(__file__).resolve().parents[2]


def test_serving_load_benchmark_smoke(tmp_path, tmp_path_factory, shared_data_dir):
    base = tiny_export(tmp_path_factory, shared_data_dir)
    output = tmp_path / "serving_load.json"
    command = [sys.executable, "benchmarks/serving_load.py", "--export", str(base)]
    command += ["--sentences", str(shared_data_dir / "multi30k" / "test_2016_flickr.en")]
    command += ["--clients", "2", "--modes", "batched", "--seconds", "1"]
    command += ["--warmup-seconds", "0", "--reference-seconds", "0.5", "--output", str(output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())

    (row,) = report["results"]
    assert (row["mode"], row["clients"]) == ("batched", 2)
    assert row["sentences"] > 0 and row["errors"] == 0 and row["mismatched_translations"] == 0
    assert row["sentences_per_second"] == row["sentences"] / row["seconds"]
    latency = row["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    memory = row["server_memory_mib"]
    assert memory["VmHWM"] >= memory["VmRSS"] > 100  # a TensorFlow process, not this one's pid
    # The server ran every request of the level in its batches (no warm-up here).
    assert row["server_batches"]["requests"] == row["sentences"]
    assert 1 <= row["mean_batch_size"] <= 2
    reference = report["reference"]
    assert reference["batch_size"] == 32 and reference["sentences_per_second"] > 0
    assert (
        report["goal"]["ratio"] == row["sentences_per_second"] / (reference["sentences_per_second"])
    )
    assert "max_batch_size { value: 64 }" in report["batching_parameters"]
    assert "| batched | 2 |" in result.stdout
    # The server's log is removed once its numbers are in the report.
    assert list(tmp_path.iterdir()) == [output]
