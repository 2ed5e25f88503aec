"""Runs a Python snippet in a fresh interpreter (another Keras backend, another distribution
strategy) and returns the JSON report it prints on its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, backend: str | None = None, timeout: int = 300) -> dict:
    """`python -c script args...` from the repository root; fails with the snippet's stderr.

    Args:
        script: the code; its last line of output must be one JSON object.
        args: command-line arguments (`sys.argv[1:]` in the snippet).
        backend: `KERAS_BACKEND` for the snippet (`"jax"` also pins JAX to the CPU).
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    if backend is not None:
        env["KERAS_BACKEND"] = backend
        if backend == "jax":
            env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
