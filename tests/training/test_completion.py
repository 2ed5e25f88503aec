"""When a run is finished: the completion marker's rules and the budget's refusal to train past
it. The commands themselves are run in test_train_command.py."""

import json
import types
from pathlib import Path

import pytest

from keras_transformer.translation import model_dir as layout
from training.callbacks import RunComplete, TrainingBudget
from training.run_config import load_run_config
from training.train import _completed

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"


def _config(*sets):
    return load_run_config([TINY], list(sets))


def _mark(model_dir, steps, reason, seconds):
    marker = {"steps": steps, "reason": reason, "train_seconds": seconds}
    (model_dir / layout.COMPLETE).write_text(json.dumps(marker))
    return marker


def test_a_run_without_marker_is_not_complete(tmp_path):
    assert _completed(tmp_path, _config("train.max_steps=1")) is None


def test_a_step_budget_is_complete_until_max_steps_is_raised(tmp_path):
    marker = _mark(tmp_path, 60, "max_steps", 12.0)
    assert _completed(tmp_path, _config("train.max_steps=60")) == marker
    assert _completed(tmp_path, _config("train.max_steps=61")) is None


def test_a_time_budget_is_complete_until_max_minutes_is_raised(tmp_path):
    marker = _mark(tmp_path, 17, "max_minutes", 30.5)
    spent = ("train.max_steps=100", "train.max_minutes=0.5")
    assert _completed(tmp_path, _config(*spent)) == marker
    assert _completed(tmp_path, _config("train.max_steps=100", "train.max_minutes=1")) is None
    assert _completed(tmp_path, _config("train.max_steps=100")) is None


def test_an_early_stop_is_complete_while_early_stopping_is_on(tmp_path):
    marker = _mark(tmp_path, 40, "early_stopping", 9.0)
    stopping = ("train.max_steps=100", "train.early_stopping_patience=2")
    assert _completed(tmp_path, _config(*stopping)) == marker
    assert _completed(tmp_path, _config("train.max_steps=100")) is None


class _Model:
    """What `TrainingBudget` reads of a model: the optimizer's step counter."""

    def __init__(self, step):
        counter = types.SimpleNamespace(numpy=lambda: step)
        self.optimizer = types.SimpleNamespace(iterations=counter)
        self.stop_training = False


def _budget(model_dir, step, max_steps, max_seconds=None):
    budget = TrainingBudget(model_dir, max_steps, max_seconds, save_every_steps=10)
    budget.set_model(_Model(step))
    return budget


def test_the_budget_refuses_to_start_a_spent_run(tmp_path):
    # Resumed at max_steps: Keras would train one more batch before any stop request.
    with pytest.raises(RunComplete) as raised:
        _budget(tmp_path, step=60, max_steps=60).on_train_begin()
    assert (raised.value.step, raised.value.reason) == (60, "max_steps")
    # The clock kept across resumes says the time budget is spent.
    (tmp_path / "train_clock.json").write_text(json.dumps({"seconds": 30.0, "step": 17}))
    with pytest.raises(RunComplete) as raised:
        _budget(tmp_path, step=17, max_steps=60, max_seconds=30.0).on_train_begin()
    assert raised.value.reason == "max_minutes"
    budget = _budget(tmp_path, step=17, max_steps=60, max_seconds=31.0)
    budget.on_train_begin()
    assert budget.reason is None
