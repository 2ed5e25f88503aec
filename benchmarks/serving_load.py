"""Load on the devserver serving a trained export: 1, 8 and 32 concurrent clients sending single
Multi30k test sentences for a fixed time, with and without server-side batching.

    python benchmarks/serving_load.py --export exports/transformer --seconds 30

For each mode (`unbatched`; `batched`: `--enable_batching` with serving/batching_parameters.txt)
and each client count, a fresh `python -m serving.devserver` process serves the export; every
client thread has its own gRPC channel and sends one sentence per request (the `serving_default`
signature, no client retries, so every failure counts) until the time is up. Reported per level:
sentences/s, p50/p95/p99 latency, errors, the server's peak resident memory (VmHWM) and, with
batching, the mean batch size the server ran (warm-up included). Every translation of a
sentence is compared with its first one across all levels (`mismatched_translations`): batching
must not change answers.

The reference is the same SavedModel run in this process on batches of 32 consecutive test
sentences (before any server starts); the goal is that batched serving with 32 clients reaches
half of it. Writes `benchmarks/results/serving_load.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serving.client import TranslationClient, TranslationClientError  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "serving_load.json"
BATCHING_PARAMETERS_FILE = REPO_ROOT / "serving" / "batching_parameters.txt"
GOAL_RATIO = 0.5  # batched serving with 32 clients >= half the in-process batch-32 throughput


def default_sentences() -> Path:
    data = Path(os.environ.get("KT_DATA_DIR", REPO_ROOT / ".." / "shared" / "data"))
    return (data / "multi30k" / "test_2016_flickr.en").resolve()


def resolve_export(path: Path) -> tuple[Path, Path]:
    """`(BASE/NAME, BASE/NAME/VERSION)` for a model folder (its newest version) or a version."""
    path = path.resolve()
    if (path / "saved_model.pb").exists():
        return path.parent, path
    versions = sorted((p for p in path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise SystemExit(f"{path} holds no numeric version folder with a saved_model.pb")
    return path, versions[-1]


def in_process_reference(version_dir: Path, sentences, signature, batch_size, seconds):
    """Sentences/s of the SavedModel's signature on batches of `batch_size`, in this process."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401 - registers the SentencePiece ops of the graph

    function = tf.saved_model.load(str(version_dir)).signatures[signature]
    batches = [
        sentences[start : start + batch_size]
        for start in range(0, len(sentences) - batch_size + 1, batch_size)
    ]
    function(text=tf.constant(batches[0]))  # warm up
    done = 0
    started = time.perf_counter()
    while done == 0 or time.perf_counter() - started < seconds:
        function(text=tf.constant(batches[done % len(batches)]))["translations"].numpy()
        done += 1
    elapsed = time.perf_counter() - started
    return {
        "batch_size": batch_size,
        "batches": done,
        "seconds": elapsed,
        "sentences_per_second": done * batch_size / elapsed,
    }


class ServerProcess:
    """`python -m serving.devserver` on a free port, its log in a file."""

    def __init__(self, base: Path, model: str, log_path: Path, batching_file: Path | None):
        command = [sys.executable, "-m", "serving.devserver", "--model_base_path", str(base)]
        command += ["--model_name", model, "--port", "0", "--file_system_poll_wait_seconds", "0"]
        if batching_file is not None:
            command += ["--enable_batching", "--batching_parameters_file", str(batching_file)]
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.address = self._wait_for_address()

    def _wait_for_address(self, timeout: float = 600.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"devserver listening on (\S+)", self.log_path.read_text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the devserver exited with {self.process.returncode}:\n"
                    + self.log_path.read_text()[-3000:]
                )
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the devserver did not start within {timeout} s")

    def memory_mib(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory of the server process, MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", status, re.MULTILINE))
        return {key: int(value) / 1024 for key, value in values.items()}

    def stop(self) -> dict[str, int] | None:
        """SIGTERM; returns the batching counters the server logs when it stops, if any."""
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        match = re.search(r"batching: (\d+) batches, (\d+) requests", self.log_path.read_text())
        if match is None:
            return None
        return {"batches": int(match.group(1)), "requests": int(match.group(2))}


def run_clients(address, model, sentences, clients, seconds, timeout, translations):
    """`clients` threads, each sending single sentences until `seconds` are up.

    Returns:
        Counters and latencies; `translations` (sentence -> first translation seen) is filled
        and checked, differences counted in "mismatched".
    """
    lock = threading.Lock()
    latencies, errors, mismatched = [], [], []
    start = threading.Barrier(clients + 1)

    def client_loop(index):
        with TranslationClient(address, model=model, timeout=timeout, retries=0) as client:
            position = index * 97  # clients start at different sentences
            start.wait()
            stop_at = time.monotonic() + seconds
            while time.monotonic() < stop_at:
                sentence = sentences[position % len(sentences)]
                position += 1
                began = time.perf_counter()
                try:
                    (translation,) = client.translate([sentence])
                except TranslationClientError as error:
                    with lock:
                        errors.append(f"{error.code.name if error.code else ''}: {error.details}")
                    continue
                latency = time.perf_counter() - began
                with lock:
                    latencies.append(latency)
                    first = translations.setdefault(sentence, translation)
                    if first != translation:
                        mismatched.append(sentence)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    latency_ms = np.array(latencies) * 1000
    percentiles = (
        {f"p{q}": float(np.percentile(latency_ms, q)) for q in (50, 95, 99)}
        if len(latencies)
        else {"p50": None, "p95": None, "p99": None}
    )
    return {
        "clients": clients,
        "seconds": elapsed,
        "sentences": len(latencies),
        "sentences_per_second": len(latencies) / elapsed,
        "latency_ms": percentiles,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "mismatched_translations": len(mismatched),
    }


def markdown_table(report) -> str:
    lines = [
        "| batching | clients | sentences/s | p50 ms | p95 ms | p99 ms | errors | "
        "server peak RSS MiB | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        lat = row["latency_ms"]
        ms = [f"{lat[k]:.0f}" if lat[k] is not None else "-" for k in ("p50", "p95", "p99")]
        mean_batch = row.get("mean_batch_size")
        lines.append(
            f"| {row['mode']} | {row['clients']} | {row['sentences_per_second']:.1f} | "
            + " | ".join(ms)
            + f" | {row['errors']} | {row['server_memory_mib']['VmHWM']:.0f} | "
            + (f"{mean_batch:.1f}" if mean_batch else "-")
            + " |"
        )
    reference = report["reference"]
    lines.append(
        f"\nIn process, batches of {reference['batch_size']}: "
        f"{reference['sentences_per_second']:.1f} sentences/s."
    )
    goal = report["goal"]
    if goal["ratio"] is not None:
        lines.append(
            f"Batched, {goal['clients']} clients: {goal['ratio']:.2f} x in-process "
            f"(goal >= {GOAL_RATIO}: {'met' if goal['met'] else 'not met'})."
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="BASE/NAME or BASE/NAME/N")
    parser.add_argument("--sentences", type=Path, default=default_sentences())
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", default=["unbatched", "batched"])
    parser.add_argument("--seconds", type=float, default=30.0, help="load per level")
    parser.add_argument("--warmup-seconds", type=float, default=3.0, help="unmeasured, per level")
    parser.add_argument("--reference-seconds", type=float, default=20.0)
    parser.add_argument("--reference-batch-size", type=int, default=32)
    parser.add_argument("--batching-parameters", type=Path, default=BATCHING_PARAMETERS_FILE)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--note", default="", help="e.g. what else ran on the machine")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode not in ("unbatched", "batched"):
            raise SystemExit(f"--modes takes unbatched and/or batched, got {mode!r}")

    base, version_dir = resolve_export(args.export)
    model = base.name
    sentences = [line for line in args.sentences.read_text().splitlines() if line.strip()]
    load_before = os.getloadavg()

    print(f"in-process reference on {version_dir} ...", flush=True)
    reference = in_process_reference(
        version_dir,
        sentences,
        "serving_default",
        args.reference_batch_size,
        args.reference_seconds,
    )
    print(f"  {reference['sentences_per_second']:.1f} sentences/s", flush=True)

    translations: dict[str, str] = {}
    rows = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        batching_file = args.batching_parameters if mode == "batched" else None
        for clients in args.clients:
            log_path = args.output.with_name(f"{args.output.stem}.{mode}.{clients}.log")
            server = ServerProcess(base, model, log_path, batching_file)
            try:
                memory_before = server.memory_mib()
                if args.warmup_seconds > 0:
                    run_clients(
                        server.address,
                        model,
                        sentences,
                        clients,
                        args.warmup_seconds,
                        args.timeout,
                        {},
                    )
                row = {"mode": mode, "clients": clients}
                row.update(
                    run_clients(
                        server.address,
                        model,
                        sentences,
                        clients,
                        args.seconds,
                        args.timeout,
                        translations,
                    )
                )
                row["server_memory_mib"] = server.memory_mib()
                row["server_memory_mib_after_start"] = memory_before
            finally:
                counters = server.stop()
            if counters:
                row["server_batches"] = counters
                row["mean_batch_size"] = counters["requests"] / max(counters["batches"], 1)
            log_path.unlink()
            print(
                f"{mode} {clients} clients: {row['sentences_per_second']:.1f} sentences/s, "
                f"p50 {row['latency_ms']['p50']} ms, {row['errors']} errors",
                flush=True,
            )
            rows.append(row)

    goal_clients = max(args.clients)
    batched = [r for r in rows if r["mode"] == "batched" and r["clients"] == goal_clients]
    ratio = (
        batched[0]["sentences_per_second"] / reference["sentences_per_second"] if batched else None
    )
    export_json = version_dir / "assets.extra" / "export.json"
    report = {
        "benchmark": "serving_load",
        "command": shlex.join(["python", "benchmarks/serving_load.py", *(argv or sys.argv[1:])]),
        "export": str(version_dir),
        "export_record": json.loads(export_json.read_text()) if export_json.exists() else None,
        "signature": "serving_default",
        "sentences_file": str(args.sentences),
        "seconds_per_level": args.seconds,
        "warmup_seconds_per_level": args.warmup_seconds,
        "client": "one gRPC channel per client thread, one sentence per request, no retries",
        "batching_parameters_file": str(args.batching_parameters),
        "batching_parameters": args.batching_parameters.read_text(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            # Clients, server and anything else share the CPUs; the load average says how busy.
            "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
            "note": args.note,
        },
        "reference": reference,
        "results": rows,
        "mismatched_translations": sum(r["mismatched_translations"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
        "goal": {
            "rule": f"batched, {goal_clients} clients >= {GOAL_RATIO} x in-process batch "
            f"{args.reference_batch_size}",
            "clients": goal_clients,
            "ratio": ratio,
            "met": None if ratio is None else ratio >= GOAL_RATIO,
        },
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(report))
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
