"""Tiny in-process runs of `training.train.train` for the switch tests, and what they leave.

Shared by `test_switches.py` and the mirrored-strategy snippet it runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "training" / "configs" / "tiny.yaml"

# One encoder and one decoder layer: tracing the train step is most of a tiny run's time.
SMALL_RUN = (
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "train.eval_every_steps=0",
    "train.max_steps=12",
    "train.steps_per_epoch=4",
    "train.log_every_steps=4",
    "train.save_every_steps=4",
)


@dataclasses.dataclass
class Run:
    """What a run returned (`summary`), the model `fit` trained, and what it printed."""

    summary: dict
    model: object
    output: str
    model_dir: Path

    @property
    def epoch_losses(self) -> list[float]:
        """Mean training loss of each Keras epoch (`model.history`)."""
        return self.model.history.history["loss"]


def run_config(model_dir, vocab, data_dir, *overrides):
    """The tiny config on Multi30k val (dev: test_2016_flickr) with `SMALL_RUN` and overrides."""
    from training.run_config import load_run_config

    return load_run_config(
        [TINY],
        [
            f"train.model_dir={model_dir}",
            f"data.vocab={vocab}",
            f"data.train=text:{data_dir}/multi30k/val",
            f"data.dev=text:{data_dir}/multi30k/test_2016_flickr",
            *SMALL_RUN,
            *overrides,
        ],
    )


def train_tiny(model_dir, vocab, data_dir, *overrides) -> Run:
    """Runs `train()` in this process and keeps the model it fits (a spy on `keras.Model.fit`)."""
    import keras

    from training.train import train

    fitted = []
    original_fit = keras.Model.fit

    def fit(self, *args, **kwargs):
        fitted.append(self)
        return original_fit(self, *args, **kwargs)

    output = io.StringIO()
    keras.Model.fit = fit
    try:
        with contextlib.redirect_stdout(output):
            summary = train(run_config(model_dir, vocab, data_dir, *overrides))
    except BaseException:
        sys.stderr.write(output.getvalue())
        raise
    finally:
        keras.Model.fit = original_fit
    assert len(fitted) == 1, f"train() called fit {len(fitted)} times"
    return Run(summary, fitted[0], output.getvalue(), Path(model_dir))


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """`{tag: {step: value}}` of every scalar in the event files under `log_dir`."""
    import tensorflow as tf

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                # Keras writes scalars with tf.summary (v2): the value is in a tensor proto.
                number = (
                    float(tf.make_ndarray(value.tensor))
                    if value.HasField("tensor")
                    else value.simple_value
                )
                scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


def logged_steps(output: str) -> list[int]:
    """The steps of the progress lines (`step      4/12 | loss ...`) in a run's output."""
    return [
        int(line.split()[1].split("/")[0])
        for line in output.splitlines()
        if line.startswith("step ")
    ]
