"""The training commands end to end on a tiny run: kill + resume, averaging, evaluation.

The run config's own checks are in test_run_config.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keras_transformer.translation import model_dir as layout
from training.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "training" / "configs" / "tiny.yaml"


# The resumed run evaluates, and decodes with a batch size that is not the default.
RESUMED = ("train.eval_every_steps=30", "decode.batch_size=32")
# Every batch shape is one XLA compilation on JAX (seconds each here): two shapes, 24 and 48.
BACKEND_SETTINGS = {"tensorflow": (), "jax": ("data.length_multiple=24",)}


def _overrides(model_dir, *extra):
    return [
        f"train.model_dir={model_dir}",
        "train.max_steps=60",
        "train.steps_per_epoch=15",
        *extra,
    ]


def _train_command(model_dir, *extra):
    sets = [arg for item in _overrides(model_dir, *extra) for arg in ("--set", item)]
    return [sys.executable, "-m", "training.train", "--config", str(TINY), *sets]


def _env(backend="tensorflow"):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), KERAS_BACKEND=backend)


def _kill_and_resume(model_dir, backend):
    """Starts a tiny run, SIGKILLs it after its step-20 save, and runs the command again.

    The first run has dev evaluation off (`eval_every_steps=0`, which once crashed at the first
    batch); the resumed one evaluates every 30 steps.
    """
    first = subprocess.Popen(
        _train_command(model_dir, "train.eval_every_steps=0", *BACKEND_SETTINGS[backend]),
        cwd=ROOT,
        env=_env(backend),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    target = layout.step_checkpoint(model_dir, 20)
    deadline = time.monotonic() + 300
    while not target.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first_output = first.communicate()[0].decode()
    assert target.exists(), first_output[-3000:]
    second = _run(model_dir, backend)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return model_dir, first_output, second.stdout


def _run(model_dir, backend):
    """The resumed run's command, run to its end."""
    command = _train_command(model_dir, *RESUMED, *BACKEND_SETTINGS[backend])
    return subprocess.run(
        command, cwd=ROOT, env=_env(backend), capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(backend)`: the killed-and-resumed tiny run of that backend, made once."""
    made = {}

    def get(backend):
        if backend not in made:
            made[backend] = _kill_and_resume(tmp_path_factory.mktemp(backend) / "tiny", backend)
        return made[backend]

    return get


@pytest.fixture(scope="module")
def resumed_run(runs):
    return runs("tensorflow")


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_killed_run_resumes_from_its_last_save(runs, backend):
    model_dir, first_output, second_output = runs(backend)
    summary = json.loads(second_output.strip().splitlines()[-1])
    assert summary["steps"] == 60 and summary["backend"] == backend
    assert summary["reason"] == "max_steps"
    steps_logged = [
        int(line.split()[1].split("/")[0])
        for line in second_output.splitlines()
        if line.startswith("step ")
    ]
    # It continued: no step at or before the step-20 save was trained (or logged) again.
    assert steps_logged and min(steps_logged) > 20, second_output
    assert (model_dir / layout.FINAL).is_file()
    assert (model_dir / layout.TRANSFORMER_CONFIG).is_file()
    assert (model_dir / layout.RUN_CONFIG).is_file()
    history = [
        json.loads(line) for line in (model_dir / layout.EVAL_HISTORY).read_text().splitlines()
    ]
    assert [entry["step"] for entry in history][-1] == 60
    assert "tok:13a" in history[-1]["signature"]
    assert (model_dir / layout.BEST).is_file()
    assert "dev BLEU" not in first_output and "step      20/60" in first_output
    if backend == "jax":
        # Fixed shapes: the train step was compiled for the two bucket shapes at most.
        assert 1 <= summary["traced_batch_shapes"] <= 2, second_output
    else:
        # data.length_multiple "auto" on TensorFlow without XLA: no padding to the bucket.
        assert "each batch padded to its longest pair" in second_output, second_output


def _artifacts(model_dir):
    """Bytes of everything a run writes that a re-run must leave alone."""
    paths = [
        model_dir / layout.FINAL,
        model_dir / layout.BEST,
        model_dir / layout.EVAL_HISTORY,
        model_dir / layout.COMPLETE,
        model_dir / "train_clock.json",
        *sorted((model_dir / layout.BACKUP).rglob("*")),
        *sorted((model_dir / "checkpoints").glob("*")),
    ]
    return {str(path.relative_to(model_dir)): path.read_bytes() for path in paths if path.is_file()}


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_finished_run_stays_finished(runs, backend):
    model_dir = runs(backend)[0]
    before = _artifacts(model_dir)
    assert f"checkpoints/{layout.step_checkpoint(model_dir, 60).name}" in before
    rerun = _run(model_dir, backend)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "run already complete at step 60 (max_steps; max_steps 60" in rerun.stdout
    assert "nothing to do" in rerun.stdout
    assert _artifacts(model_dir) == before


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_run_killed_before_its_completion_marker_is_only_marked(runs, backend, tmp_path):
    """Killed after its last backup (step 60) but before `complete.json`: the re-run restores
    step 60 and saves it; it must not train step 61."""
    model_dir = runs(backend)[0]
    final = _weights(model_dir / layout.FINAL)
    (model_dir / layout.COMPLETE).unlink()
    (model_dir / layout.FINAL).unlink()
    rerun = _run(model_dir, backend)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed at step 60: max_steps already reached" in rerun.stdout
    assert not [line for line in rerun.stdout.splitlines() if line.startswith("step ")]
    assert [step for step, _ in layout.list_step_checkpoints(model_dir)][-1] == 60
    for saved, restored in zip(final, _weights(model_dir / layout.FINAL), strict=True):
        np.testing.assert_array_equal(saved, restored)
    assert json.loads((model_dir / layout.COMPLETE).read_text())["steps"] == 60


def _weights(path):
    import h5py

    with h5py.File(path, "r") as file:
        arrays = []
        file.visititems(
            lambda name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None
        )
    return arrays


def test_the_run_writes_its_config_and_decode_settings(resumed_run):
    model_dir = resumed_run[0]
    written = load_run_config([model_dir / layout.RUN_CONFIG])
    assert written == load_run_config([TINY], _overrides(model_dir, *RESUMED))
    # decode.batch_size differs from the defaults that a missing file would give.
    assert layout.load_decode_settings(model_dir) == written.decode
    assert written.decode.batch_size == 32
    assert (model_dir / layout.DECODE_SETTINGS).is_file()


def test_special_ids_that_disagree_with_the_vocabulary_are_refused(resumed_run):
    result = subprocess.run(
        _train_command(resumed_run[0], "model.eos_id=5"),
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1].replace(str(resumed_run[0]), "MODEL_DIR")
    # Refused as a disagreement with the vocabulary (not only as a changed model), naming both
    # values: the config's 5 and the vocabulary's 3.
    assert "spm.model" in error and "eos_id" in error, error
    assert re.search(r"\b5\b", error) and re.search(r"\b3\b", error), error


def test_resuming_with_another_model_is_refused(resumed_run, tmp_path):
    model_dir = resumed_run[0]
    result = subprocess.run(
        _train_command(model_dir, "model.ffn_dim=48"),
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "already holds a different model" in result.stderr and "ffn_dim" in result.stderr


def test_average_of_the_last_checkpoints_is_their_mean(resumed_run):
    from training.average import average_checkpoints, select_checkpoints

    model_dir = resumed_run[0]
    paths = select_checkpoints(model_dir, last=3)
    assert [p.name for p in paths] == [f"step-000000{s}.weights.h5" for s in (40, 50, 60)]
    output = average_checkpoints(model_dir, paths)
    weights = []
    for path in [*paths, output]:
        model, _ = layout.load_transformer(model_dir, checkpoint=str(path))
        weights.append(model.get_weights())
    for *inputs, averaged in zip(*weights, strict=True):
        np.testing.assert_allclose(averaged, np.mean(inputs, axis=0), rtol=1e-5, atol=1e-7)
    assert layout.resolve_weights(model_dir) == output
    with pytest.raises(ValueError, match="--last 99 asks for more checkpoints than the"):
        select_checkpoints(model_dir, last=99)
    with pytest.raises(ValueError, match="--last must be a positive number of checkpoints, got 0"):
        select_checkpoints(model_dir, last=0)


def test_evaluate_prints_bleu_with_signature_and_chrf(resumed_run, tmp_path, shared_data_dir):
    from training.evaluate import evaluate

    result = evaluate(
        resumed_run[0],
        f"text:{shared_data_dir}/multi30k/test_2016_flickr",
        "en",
        "de",
        beam_size=1,
        limit=12,
        output=tmp_path / "hyp.txt",
    )
    assert result["sentences"] == 12
    assert "case:mixed" in result["bleu_signature"] and "tok:13a" in result["bleu_signature"]
    hypotheses = (tmp_path / "hyp.txt").read_text().splitlines()
    assert len(hypotheses) == 12
    # The reported scores are sacreBLEU's on the written hypotheses (a 60-step model's
    # translations are poor, so the values themselves say little).
    import sacrebleu

    references = (shared_data_dir / "multi30k" / "test_2016_flickr.de").read_text().splitlines()
    expected = sacrebleu.corpus_bleu(hypotheses, [references[:12]]).score
    assert result["bleu"] == pytest.approx(expected, abs=0.01)
    assert result["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(hypotheses, [references[:12]]).score, abs=0.01
    )


def test_averaging_study_scores_every_window_and_alpha_on_dev(
    resumed_run, tmp_path, shared_data_dir
):
    """`benchmarks/averaging_study.py` on the tiny run: catches a window that does not average
    the last N checkpoints, an alpha or beam size that does not reach the decoder, a best cell
    that is not the highest dev BLEU, and a cell scored on other segments than asked."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import averaging_study

    output = tmp_path / "study.json"
    model_dir = resumed_run[0]
    code = averaging_study.main(
        [str(model_dir), "--last", "1,3", "--alphas", "0.6,1.0", "--limit", "8"]
        + ["--dev", f"text:{shared_data_dir}/multi30k/val", "--output", str(output)]
    )
    assert code == 0
    study = json.loads(output.read_text())
    cells = study["cells"]
    assert [(c["last"], c["alpha"]) for c in cells] == [(1, 0.6), (1, 1.0), (3, 0.6), (3, 1.0)]
    assert all(c["beam_size"] == c["decoding"]["beam_size"] == 4 for c in cells)
    assert cells[0]["checkpoint_steps"] == ["step-00000060.weights.h5"]
    assert cells[2]["checkpoint_steps"] == [f"step-000000{s}.weights.h5" for s in (40, 50, 60)]
    assert all(c["decoding"]["length_penalty_alpha"] == c["alpha"] for c in cells)
    assert all(c["sentences"] == 8 for c in cells) and study["dev_segments"] == 8
    best = max(c["bleu"] for c in cells)
    assert study["best_on_dev"]["bleu"] == best
    with pytest.raises(SystemExit):
        averaging_study.main([str(model_dir), "--last", "five", "--output", str(output)])
    # Beam sizes reach the decoder too (and a beam of 0 is refused).
    averaging_study.main(
        [str(model_dir), "--last", "1", "--alphas", "1.0", "--beam-sizes", "1,2", "--limit", "8"]
        + ["--dev", f"text:{shared_data_dir}/multi30k/val", "--output", str(output)]
    )
    cells = json.loads(output.read_text())["cells"]
    assert [(c["beam_size"], c["decoding"]["beam_size"]) for c in cells] == [(1, 1), (2, 2)]
    with pytest.raises(SystemExit):
        averaging_study.main([str(model_dir), "--beam-sizes", "0", "--output", str(output)])
