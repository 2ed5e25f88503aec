"""`training.curves` on hand-written logs: a resumed run's repeated steps, BLEU timing."""

import json

import numpy as np
import pytest

from keras_transformer.translation import model_dir as layout
from training import curves


def _write(path, entries):
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))


def test_resumed_steps_keep_the_later_entry_and_bleu_gets_interpolated_time(tmp_path):
    """A run killed after step 20 (backup at 10) logs steps 20 and 30 twice; the entries the
    run continued from are the later ones. Catches duplicated x values and BLEU plotted
    against the wrong time."""
    progress = [
        {"step": 10, "loss": 5.0, "elapsed_seconds": 10.0},
        {"step": 20, "loss": 4.0, "elapsed_seconds": 20.0},
        {"step": 20, "loss": 3.9, "elapsed_seconds": 22.0},
        {"step": 30, "loss": 3.5, "elapsed_seconds": 30.0},
    ]
    for entry in progress:
        entry.update(token_accuracy=0.1, learning_rate=1e-3, target_tokens_per_second=100.0)
    _write(tmp_path / layout.PROGRESS, progress)
    _write(tmp_path / layout.EVAL_HISTORY, [{"step": 25, "bleu": 1.5}])
    data = curves.curves(tmp_path)
    assert data["loss"]["step"].tolist() == [10, 20, 30]
    assert data["loss"]["value"].tolist() == [5.0, 3.9, 3.5]
    np.testing.assert_allclose(data["bleu"]["seconds"], [26.0])


def test_a_run_without_progress_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="progress.jsonl"):
        curves.curves(tmp_path)
    assert curves.main(["--model-dir", str(tmp_path)]) == 2
    assert "No training progress" in capsys.readouterr().err
