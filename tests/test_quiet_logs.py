"""Commands hide TensorFlow's native logging by default and show it with --verbose / KT_VERBOSE=1;
Python errors and warnings still reach stderr (`quiet_logs.py`).

Three commands run in subprocesses, as a user runs them, concurrently (each imports TensorFlow,
~8 s of CPU; marked slow): `training.translate` runs TensorFlow ops (the first op is what logs
"failed call to cuInit" on a machine without a GPU), `serving.export` with a bad argument value
fails after TensorFlow is imported, `training.curves --verbose` plots a two-line progress log.
The capture itself is checked in a second against a fake `tensorflow` package.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What TensorFlow 2.21 writes on a CPU-only machine (see quiet_logs.py): absl's pre-init notice,
# native log lines ("I0000 00:00:1796207449.117959   18333 cudart_stub.cc:31] ..."), the CPU
# feature notice's second line.
NATIVE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|WARNING: All log messages before absl"
    r"|To enable the following instructions)",
    re.MULTILINE,
)
NOISE_WORDS = ("cudart_stub", "cpu_feature_guard", "absl::InitializeLog", "cuInit")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KT_VERBOSE")}
    return dict(env, PYTHONPATH=str(ROOT), KERAS_BACKEND="tensorflow", **extra)


def _assert_quiet(stderr: str):
    assert not NATIVE.search(stderr), stderr
    for word in NOISE_WORDS:
        assert word not in stderr, stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data_dir):
    """A `tiny` model directory (300-piece vocabulary) with random weights and a progress log."""
    import keras

    from keras_transformer import build_transformer
    from keras_transformer.translation import model_dir as layout
    from tests.serving.tiny_run import write_model_dir_files

    directory = tmp_path_factory.mktemp("quiet_run")
    keras.utils.set_random_seed(0)
    _, config, _, _ = write_model_dir_files(directory, shared_data_dir)
    build_transformer(config).save_weights(directory / layout.FINAL)
    progress = [
        dict(
            step=step,
            elapsed_seconds=2.0 * step,
            loss=9.0 / step,
            token_accuracy=0.1 * step,
            learning_rate=1e-4 * step,
            target_tokens_per_second=1000.0,
        )
        for step in (1, 2)
    ]
    (directory / layout.PROGRESS).write_text("".join(json.dumps(p) + "\n" for p in progress))
    return directory


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """`{name: CompletedProcess}` of the commands, started together."""
    out = tmp_path_factory.mktemp("quiet_out")
    python = [sys.executable, "-m"]
    commands = {
        "translate": (
            python
            + ["training.translate", "--model-dir", str(model_dir), "--beam-size", "1"]
            + ["A man rides a bike."],
            _env(),
        ),
        "export_bad_value": (
            python
            + ["serving.export", "--model-dir", str(model_dir), "--output"]
            + [str(out / "t" / "1"), "--beam-size", "abc"],
            _env(),
        ),
        "curves_verbose": (
            python
            + ["training.curves", "--model-dir", str(model_dir), "--output-dir"]
            + [str(out / "curves"), "--verbose"],
            _env(),
        ),
    }
    started = {
        name: subprocess.Popen(
            command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name, (command, env) in commands.items()
    }
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(
            commands[name][0], process.returncode, stdout, stderr
        )
    return results


@pytest.mark.slow
def test_a_command_that_runs_tensorflow_ops_prints_only_its_result(runs):
    run = runs["translate"]
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 1 and run.stdout.strip(), run.stdout
    _assert_quiet(run.stderr)
    assert run.stderr == "", run.stderr


@pytest.mark.slow
def test_a_bad_argument_value_still_reaches_stderr(runs):
    run = runs["export_bad_value"]
    assert run.returncode == 2
    assert "argument --beam-size: invalid int value: 'abc'" in run.stderr, run.stderr
    _assert_quiet(run.stderr)


@pytest.mark.slow
def test_verbose_flag_brings_tensorflow_logging_back(runs):
    run = runs["curves_verbose"]
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)["figures"]
    assert [Path(f).name for f in figures] == ["curves_by_step.png", "curves_by_time.png"]
    assert NATIVE.search(run.stderr), run.stderr


def _run_snippet(code: str, tmp_path: Path, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=dict(_env(**extra_env), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def fake_tensorflow(tmp_path):
    """A `tensorflow` package on the path that writes, while imported, what the real one writes
    to descriptor 2 and a Python warning: checks the capture without TensorFlow's 8 s import."""
    package = tmp_path / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import os, warnings
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called\\n")
            os.write(2, b"I0000 00:00:1796207449.117959   18333 cudart_stub.cc:31] no cuda\\n")
            warnings.warn("a real warning from the import")
            LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
            """
        )
    )
    return tmp_path


def test_the_import_capture_keeps_python_output_and_restores_stderr(fake_tensorflow):
    run = _run_snippet(
        """
        import sys
        import quiet_logs
        quiet_logs.quiet_tensorflow([])
        import tensorflow
        print(tensorflow.LEVEL, tensorflow.__spec__.loader.__class__.__name__)
        raise SystemExit("an error after the import")
        """,
        fake_tensorflow,
    )
    assert run.stdout.split() == ["3", "SourceFileLoader"]
    assert "UserWarning: a real warning from the import" in run.stderr
    assert "an error after the import" in run.stderr
    _assert_quiet(run.stderr)


def test_verbose_leaves_the_import_alone(fake_tensorflow):
    code = """
        import quiet_logs
        quiet_logs.quiet_tensorflow({argv})
        import tensorflow
        print(tensorflow.LEVEL)
        """
    for argv, env in (("['--verbose']", {}), ("[]", {"KT_VERBOSE": "yes"})):
        run = _run_snippet(code.format(argv=argv), fake_tensorflow, **env)
        assert run.stdout.split() == ["None"], (argv, env, run)
        assert "cudart_stub.cc:31] no cuda" in run.stderr
        assert "absl::InitializeLog" in run.stderr


def test_the_verbose_argument_undoes_the_quiet_import(fake_tensorflow):
    """`main(["--verbose"])` called in-process, after the package quieted the import."""
    run = _run_snippet(
        """
        import argparse
        import quiet_logs
        quiet_logs.quiet_tensorflow([])
        parser = argparse.ArgumentParser()
        quiet_logs.add_verbose_argument(parser)
        print(parser.parse_args(["--verbose"]).verbose, parser.parse_args([]).verbose)
        import tensorflow
        print(tensorflow.LEVEL)
        """,
        fake_tensorflow,
    )
    assert run.stdout.split() == ["True", "False", "None"], run
    assert "cudart_stub.cc:31] no cuda" in run.stderr


def test_a_bad_kt_verbose_value_is_named(fake_tensorflow):
    run = _run_snippet(
        "import quiet_logs; quiet_logs.quiet_tensorflow([])", fake_tensorflow, KT_VERBOSE="maybe"
    )
    assert run.returncode == 1
    assert "KT_VERBOSE must be one of" in run.stderr and "'maybe'" in run.stderr


def test_verbose_after_double_dash_is_an_argument_not_the_flag(monkeypatch):
    import quiet_logs

    monkeypatch.delenv("KT_VERBOSE", raising=False)

    assert quiet_logs.verbose_requested(["--x", "--verbose"])
    assert not quiet_logs.verbose_requested(["--", "--verbose"])
