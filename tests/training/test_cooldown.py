"""The cooldown (`train.cooldown_fraction`): the learning rate falls linearly to 0 over the last
part of the budget, on both backends, and from the clock when the budget is in minutes."""

import importlib.util
import json

import pytest

from tests.subprocess_report import ROOT, run_script
from training.callbacks import Cooldown, TrainingBudget
from training.run_config import ConfigError, load_run_config

# Two identical models fitted for 10 steps: one with the cooldown callback over the last 40% of
# a 10-step budget, one with a schedule that is the expected rate written out per step. Equal
# weights mean the multiplier reached every update (and on JAX, the trainer's state).
SCRIPT = r"""
import json, sys, tempfile
import numpy as np, keras
from keras_transformer.optimizers import Adam
from training.callbacks import Cooldown, TrainingBudget

STEPS, FRACTION, BASE = 10, 0.4, 0.05

class Written(keras.optimizers.schedules.LearningRateSchedule):
    # The cooldown's rate at update `step` (progress step / STEPS before the update).
    def __call__(self, step):
        progress = keras.ops.cast(step, "float32") / STEPS
        return BASE * keras.ops.minimum(1.0, (1.0 - progress) / FRACTION)

def fitted(optimizer, callbacks):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(10 * 8, 4)).astype("float32")
    model.fit(x, x[:, :3] * 2.0, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=callbacks)
    return model

budget = TrainingBudget(tempfile.mkdtemp(), STEPS, save_every_steps=5)
rates = []
class Rates(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
cooled = fitted(Adam(BASE, rate_multiplier=True), [budget, Cooldown(budget, FRACTION), Rates()])
written = fitted(Adam(Written()), [])
plain = fitted(Adam(BASE), [])
gap = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))
print(json.dumps({"backend": keras.config.backend(), "rates": rates,
                  "written_gap": gap(cooled, written), "plain_gap": gap(cooled, plain),
                  "config": cooled.optimizer.get_config()["rate_multiplier"]}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_cooldown_rate_reaches_every_update_on_both_backends(backend):
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed")
    report = run_script(SCRIPT, backend=backend)
    assert report["backend"] == backend and report["config"] is True
    assert report["written_gap"] < 1e-6, report
    assert report["plain_gap"] > 1e-3, report
    # Read after update k: the rate with the multiplier set before update k, 0.05 until 60%
    # of the budget is spent, then 0.05 * (1 - (k - 1)/10) / 0.4 (1.0 .. 0.25 for k = 7..10).
    expected = [0.05 * min(1.0, (1 - (step - 1) / 10) / 0.4) for step in range(1, 11)]
    assert report["rates"][:6] == pytest.approx([0.05] * 6, rel=1e-6)
    assert report["rates"] == pytest.approx(expected, rel=1e-5), report["rates"]


class _Model:
    def __init__(self, step):
        import types

        counter = types.SimpleNamespace(numpy=lambda: step)
        self.optimizer = types.SimpleNamespace(iterations=counter)


def test_a_time_budget_cools_down_by_the_clock_and_resumes_from_it(tmp_path):
    (tmp_path / "train_clock.json").write_text(json.dumps({"seconds": 45.0, "step": 3}))
    budget = TrainingBudget(tmp_path, max_steps=1000, max_seconds=60.0, save_every_steps=10)
    budget.set_model(_Model(3))
    budget.on_train_begin()
    # 45 of 60 seconds already spent before this (resumed) process started.
    assert budget.progress(3) == pytest.approx(0.75, abs=1e-3)
    # Steps further along than the clock decide instead.
    assert budget.progress(900) == pytest.approx(0.9)
    budget.elapsed_before = 100.0
    assert budget.progress(3) == 1.0


def test_bad_cooldown_fractions_are_refused_with_their_value():
    tiny = ROOT / "training" / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"train.cooldown_fraction: must be below 1, got 1.0"):
        load_run_config([tiny], ["train.cooldown_fraction=1.0"])
    with pytest.raises(ConfigError, match=r"cooldown_fraction: must be at least 0, got -0.1"):
        load_run_config([tiny], ["train.cooldown_fraction=-0.1"])
    assert load_run_config([tiny], ["train.cooldown_fraction=0.3"]).train.cooldown_fraction == 0.3
    with pytest.raises(ValueError, match=r"in \(0, 1\), got 1.5"):
        Cooldown(None, 1.5)
