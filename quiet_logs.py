"""Quiet commands: TensorFlow's native logging is hidden unless `--verbose` or KT_VERBOSE=1.

`training/`, `serving/` and the benchmarks call `quiet_tensorflow()` before anything imports
TensorFlow (Keras imports it on the TensorFlow backend). It lives beside those applications,
not in `keras_transformer`, whose `__init__` imports Keras (and so TensorFlow) first.

What a CPU-only machine prints without it, and why `TF_CPP_MIN_LOG_LEVEL=3` alone is not enough
(checked with TensorFlow 2.21): during `import tensorflow`, before absl's logging is initialised,
"WARNING: All log messages before absl::InitializeLog() ..." and "cudart_stub.cc ... Could not
find cuda drivers" are written to file descriptor 2 whatever the level; `cpu_feature_guard.cc`
(INFO) and, at the first op, "failed call to cuInit" (ERROR) obey the level. So the level is set
to 3 and descriptor 2 is sent to a temporary file while `tensorflow` is imported; afterwards the
native log lines are dropped and anything else written meanwhile (Python warnings, errors) is
passed on to stderr. A crash inside TensorFlow's import is the one thing this hides: rerun with
`--verbose` to see it.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

VERBOSE_ENV = "KT_VERBOSE"
VERBOSE_FLAG = "--verbose"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

# A line of TensorFlow's (absl's) native log, "I0000 00:00:1796207449.117959   18333
# cudart_stub.cc:31] ...": severity, date, time (before absl is initialised, seconds since 1970),
# thread, file:line. Also absl's pre-init notice and the CPU feature notice's second line.
_NATIVE_LINE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions: .* rebuild TensorFlow)"
)
# Python-level messages that describe nothing the user can act on in these commands: the
# training input has a few fixed batch shapes, each traced once by design.
_NOISE_MESSAGES = ("triggered tf.function retracing",)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE_MESSAGES)


_FILTER = _NoiseFilter()
_state = {"quiet": False, "set_level": False}


def verbose_requested(argv: list[str] | None = None) -> bool:
    """True when `--verbose` is among the command's arguments or KT_VERBOSE is 1/true/yes/on.

    Raises:
        ValueError: KT_VERBOSE holds something other than a yes/no value.
    """
    value = os.environ.get(VERBOSE_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(
            f"{VERBOSE_ENV} must be one of {', '.join(_TRUE + _FALSE[1:])} or empty, "
            f"got {os.environ[VERBOSE_ENV]!r}"
        )
    argv = sys.argv[1:] if argv is None else argv
    arguments = argv[: argv.index("--")] if "--" in argv else argv
    return value in _TRUE or VERBOSE_FLAG in arguments


def _is_native_line(line: str) -> bool:
    return bool(_NATIVE_LINE.match(line))


class _QuietImportFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and imports it with descriptor 2 captured."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # Only the first import; also lets find_spec below recurse.
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module's spec keeps the real loader: importlib.resources and friends look at it.
        module.__spec__.loader = module.__loader__ = self.loader
        with tempfile.TemporaryFile(mode="w+b") as captured:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                text = captured.read().decode("utf-8", "replace")
                kept = [line for line in text.splitlines(True) if not _is_native_line(line)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()


_FINDER = _QuietImportFinder()


def quiet_tensorflow(argv: list[str] | None = None) -> bool:
    """Hide TensorFlow's native logging and known noise, unless the command runs verbose.

    Call before `keras` or `tensorflow` is imported. A TF_CPP_MIN_LOG_LEVEL already in the
    environment is kept. Returns whether the command runs verbose.
    """
    if verbose_requested(argv):
        return True
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        _state["set_level"] = True
    if "tensorflow" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    logging.getLogger("tensorflow").addFilter(_FILTER)
    _state["quiet"] = True
    return False


def be_verbose() -> None:
    """Undo `quiet_tensorflow()`: native logs of a TensorFlow not yet imported, Python warnings."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    if _state["set_level"]:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        _state["set_level"] = False
    logging.getLogger("tensorflow").removeFilter(_FILTER)
    _state["quiet"] = False


class _VerboseAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        be_verbose()


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """Adds `--verbose` to a command's parser (TensorFlow's own logging back on)."""
    parser.add_argument(
        VERBOSE_FLAG,
        action=_VerboseAction,
        help=(
            "show TensorFlow's native log lines (start-up, devices, C++ warnings) and "
            f"retracing warnings, hidden by default; same as {VERBOSE_ENV}=1"
        ),
    )
