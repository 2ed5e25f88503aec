"""Compiling and loading the package's TensorFlow CPU kernels on first use.

The kernels are C++ TensorFlow ops (`*.cc` next to this file) for the few places where
TensorFlow's own CPU ops make many passes over a large tensor that one loop can do in one. They
are compiled on the machine that runs them, the first time a process asks for them, with the
C++ compiler (`$CXX`, else `g++`), TensorFlow's own compile and link flags
(`tf.sysconfig`) and `-march=native`, into a cache
(`$KERAS_TRANSFORMER_CACHE`, else `$XDG_CACHE_HOME/keras_transformer` or
`~/.cache/keras_transformer`) keyed by the sources and headers, the TensorFlow version, the
compiler and the CPU's flags: once per machine and TensorFlow version, then a load.

Where they cannot be had (no compiler, a failed compile or load, a GPU, an XLA-compiled
function; see `kernels_for`) callers use their TensorFlow-ops path, which computes the same
thing more slowly; a failed build or load is given once as a warning with its reason.
`KERAS_TRANSFORMER_NATIVE_KERNELS=0` turns them off without a warning (it is read each time a
graph asks, so one process can trace both paths).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
SWITCH = "KERAS_TRANSFORMER_NATIVE_KERNELS"

_loaded: dict = {}


def enabled() -> bool:
    """False where `KERAS_TRANSFORMER_NATIVE_KERNELS` is `0`, `false`, `no` or `off`."""
    value = os.environ.get(SWITCH, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on", ""):
        return True
    raise ValueError(f"{SWITCH} must be 1 or 0 (on or off); got {value!r}")


def library():
    """The loaded op library (a module of op functions), or None where it cannot be had.

    None when turned off (`enabled()`), or when compiling or loading failed (warned once, with
    the reason; `unavailable_reason()` returns it).
    """
    if not enabled():
        return None
    if "library" not in _loaded:
        try:
            _loaded["path"] = _build()
            _loaded["library"] = _load(_loaded["path"])
        except KernelBuildError as error:
            _loaded["library"], _loaded["reason"] = None, str(error)
            warnings.warn(
                f"keras_transformer's native kernels are unavailable ({error}); using "
                "TensorFlow ops, which compute the same thing more slowly",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded["library"]


def kernels_for(tensor):
    """`library()` where the graph being traced can run it on `tensor`, else None.

    None for dtypes other than float32 and bfloat16, where a GPU is visible (the kernels are
    CPU-only; TensorFlow's ops run where the tensors are), and inside a function compiled by
    XLA (`jit_compile=True`), which cannot compile custom ops.
    """
    import tensorflow as tf

    if tensor.dtype not in (tf.float32, tf.bfloat16):
        return None
    if tf.config.list_logical_devices("GPU") or _in_xla_function():
        return None
    return library()


def _in_xla_function() -> bool:
    import tensorflow as tf

    try:
        # How `tf.function(jit_compile=True)` marks what it traces (an XLA control-flow
        # context on the graph or an outer one); not public API, so a TensorFlow without it
        # counts as "not XLA" and a jit-compiled run would fail to compile, naming the op.
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def describe() -> str:
    """One line for a run's log: which path the loss, layer norm and dropout take, and why."""
    if not enabled():
        return f"TensorFlow ops ({SWITCH}=0)"
    if library() is None:
        return f"TensorFlow ops (compiled kernels unavailable: {unavailable_reason()})"
    return f"compiled ({_loaded['path']})"


def unavailable_reason() -> str | None:
    """Why `library()` returned None after a failed build or load; None otherwise."""
    return _loaded.get("reason")


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why."""


def cache_dir() -> Path:
    if os.environ.get("KERAS_TRANSFORMER_CACHE"):
        return Path(os.environ["KERAS_TRANSFORMER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keras_transformer"


def _cpu_flags() -> str:
    # -march=native makes the library specific to this CPU's instruction sets.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    import tensorflow as tf

    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler {compiler!r} on PATH (set CXX to one)")
    sources = sorted(SOURCE_DIR.glob("*.cc"))
    headers = sorted(SOURCE_DIR.glob("*.h"))
    command = [
        compiler,
        "-shared",
        "-fPIC",
        "-O3",
        "-march=native",
        "-w",
        *tf.sysconfig.get_compile_flags(),
        *(str(s) for s in sources),
    ]
    link = tf.sysconfig.get_link_flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in sources + headers), tf.__version__):
        key.update(part if isinstance(part, bytes) else part.encode())
    key.update(" ".join(command + link).encode())
    key.update(version.encode())
    key.update(_cpu_flags().encode())
    target = cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        message = f"cannot create the cache directory {target.parent}: {error}"
        raise KernelBuildError(message) from error
    # Compiled beside the target and renamed into place: processes that build at once (the
    # workers of one job) each finish with a whole library.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        result = subprocess.run(
            [*command, "-o", str(partial), *link], capture_output=True, text=True
        )
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-5:]
            raise KernelBuildError(
                f"{compiler} exited with {result.returncode}: " + " | ".join(tail)
            )
        os.replace(partial, target)
    return target


def _load(path: Path):
    import tensorflow as tf

    try:
        return tf.load_op_library(str(path))
    except Exception as error:  # a library built for another TensorFlow, a missing symbol
        raise KernelBuildError(f"loading {path} failed: {error}") from error
