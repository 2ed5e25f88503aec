"""Keras callbacks of the training command: progress, step checkpoints, dev BLEU, time budget."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import keras
import numpy as np

from keras_transformer.translation import model_dir as layout
from training import distributed


def _positive_steps(name, value):
    """An interval in steps; 0 would divide by zero at the first batch, so it is refused here
    (the run config turns dev evaluation off by not creating its callback)."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive number of steps, got {value!r}")
    return int(value)


class UpdateCallback(keras.callbacks.Callback):
    """A callback that acts once per optimizer update, not once per batch.

    With `train.gradient_accumulation_steps: k` Keras runs k batches per update, and
    `optimizer.iterations` (which counts updates) repeats for k - 1 of them, 0 included before
    the first update; acting on every batch would save, log and evaluate k times per step.
    Subclasses that override `on_train_begin` call this one.
    """

    def on_train_begin(self, logs=None):
        self._last_step = self.current_step()

    def current_step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def completed_update(self) -> int | None:
        """The step just reached when this batch completed an update, else `None`."""
        step = self.current_step()
        if step == self._last_step:
            return None
        self._last_step = step
        return step


class Backup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` (double checkpoint, kept after training) where only the process with
    `writes` keeps what it saves; every process restores. In a multi-process run all processes
    hold the same state, and writing it from each would race on one shared file."""

    def __init__(self, backup_dir, save_freq, writes=True):
        super().__init__(
            backup_dir, save_freq=save_freq, double_checkpoint=True, delete_checkpoint=False
        )
        self.writes = writes

    def _save_model(self):
        if self.writes:
            with distributed.local_variables():
                super()._save_model()
        else:
            distributed.save_weights(self.model, self._weights_path, writes=False)


class ProgressLogger(UpdateCallback):
    """Prints step, loss, accuracy, learning rate, target tokens/s and ETA every N steps.

    Reads the `target_tokens` metric, a running count within each Keras epoch. With
    `progress_path`, each line is also appended there as JSON (what `training.curves` plots).
    Without `writes` (processes other than 0) it computes the same and prints nothing.
    """

    def __init__(
        self,
        every_steps,
        max_steps,
        max_seconds=None,
        elapsed_before=0.0,
        progress_path=None,
        writes=True,
    ):
        super().__init__()
        self.writes = writes
        self.every_steps = _positive_steps("every_steps", every_steps)
        self.max_steps = int(max_steps)
        self.max_seconds = max_seconds
        self.elapsed_before = float(elapsed_before)
        self.progress_path = None if progress_path is None else Path(progress_path)

    def on_train_begin(self, logs=None):
        # BackupAndRestore runs before this callback, so a resumed run starts at its step.
        super().on_train_begin(logs)
        self.first_step = self.current_step()
        self.start = self.window_start = time.monotonic()
        self.window_tokens = 0.0
        self.epoch_tokens = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_tokens = 0.0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        tokens = float(logs.get("target_tokens", 0.0))
        self.window_tokens += max(tokens - self.epoch_tokens, 0.0)
        self.epoch_tokens = tokens
        step = self.completed_update()
        if step is None or step % self.every_steps:
            return
        now = time.monotonic()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        elapsed = self.elapsed_before + now - self.start
        per_step = (now - self.start) / max(step - self.first_step, 1)
        eta = (self.max_steps - step) * per_step
        if self.max_seconds:
            eta = min(eta, max(self.max_seconds - elapsed, 0.0))
        entry = {
            "step": step,
            "loss": float(logs.get("loss", float("nan"))),
            "token_accuracy": float(logs.get("token_accuracy", float("nan"))),
            "learning_rate": float(np.asarray(self.model.optimizer.learning_rate)),
            "target_tokens_per_second": rate,
            "elapsed_seconds": elapsed,
        }
        if not self.writes:
            self.window_start, self.window_tokens = now, 0.0
            return
        print(
            f"step {step:>7d}/{self.max_steps} | loss {entry['loss']:.4f}"
            f" | acc {entry['token_accuracy']:.4f}"
            f" | lr {entry['learning_rate']:.2e} | {rate:,.0f} tgt tok/s"
            f" | elapsed {_clock(elapsed)} | ETA {_clock(eta)}",
            flush=True,
        )
        if self.progress_path is not None:
            with self.progress_path.open("a") as file:
                file.write(json.dumps({k: round(v, 6) for k, v in entry.items()}) + "\n")
        self.window_start, self.window_tokens = now, 0.0


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepCheckpoints(UpdateCallback):
    """Saves weights every N steps as `checkpoints/step-XXXXXXXX.weights.h5`, keeping the last K.

    These are what `training.average` averages; `BackupAndRestore` keeps the resumable state.
    """

    def __init__(self, model_dir, every_steps, keep=10, writes=True):
        super().__init__()
        self.writes = writes
        self.model_dir = Path(model_dir)
        self.every_steps = _positive_steps("every_steps", every_steps)
        self.keep = int(keep)

    def on_train_batch_end(self, batch, logs=None):
        step = self.completed_update()
        if step is not None and step % self.every_steps == 0:
            self.save(step)

    def save(self, step):
        path = layout.step_checkpoint(self.model_dir, step)
        if self.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
        distributed.save_weights(self.model, path, writes=self.writes)
        if self.writes:
            for _, old in layout.list_step_checkpoints(self.model_dir)[: -self.keep]:
                old.unlink(missing_ok=True)


class BleuEvaluator(UpdateCallback):
    """Every N steps: translates dev sentences, scores sacreBLEU, keeps the best weights.

    `translator_factory(model)` gives the object whose `translate(sentences)` decodes them
    (`training.train` passes a greedy `Translator`); it is made at the first evaluation.
    Appends `{"step", "bleu", "signature", "sentences", "sources_sha1", "seconds"}` to
    `bleu_history.jsonl`, saves `best.weights.h5` when BLEU improves, and stops training after
    `patience` evaluations without a gain.
    """

    def __init__(
        self,
        model_dir,
        translator_factory,
        sources,
        references,
        every_steps,
        patience=None,
        writes=True,
        agree=bool,
    ):
        super().__init__()
        # In a multi-process run every process evaluates, `writes` is process 0's, and
        # `agree` makes the early-stopping decision process 0's everywhere.
        self.writes = writes
        self.agree = agree
        self.model_dir = Path(model_dir)
        self.translator_factory = translator_factory
        self.sources = list(sources)
        self.references = list(references)
        self.every_steps = _positive_steps("every_steps", every_steps)
        self.patience = patience
        self.history_path = self.model_dir / layout.EVAL_HISTORY
        history = self.history()
        self.best = max((entry["bleu"] for entry in history), default=-1.0)
        self.since_best = 0
        for entry in history:
            self.since_best = 0 if entry["bleu"] >= self.best else self.since_best + 1
        self.stopped_early = False
        self._translator = None
        self.sources_sha1 = hashlib.sha1("\n".join(self.sources).encode("utf-8")).hexdigest()

    def history(self):
        if not self.history_path.is_file():
            return []
        return [json.loads(line) for line in self.history_path.read_text().splitlines() if line]

    def on_train_batch_end(self, batch, logs=None):
        step = self.completed_update()
        if step is not None and step % self.every_steps == 0:
            self.evaluate(step)

    def evaluate(self, step):
        import sacrebleu

        if self._translator is None:
            self._translator = self.translator_factory(self.model)
        start = time.monotonic()
        hypotheses = self._translator.translate(self.sources)
        bleu = sacrebleu.metrics.BLEU()
        score = bleu.corpus_score(hypotheses, [self.references])
        entry = {
            "step": step,
            "bleu": round(score.score, 2),
            "signature": str(bleu.get_signature()),
            "sentences": len(self.sources),
            # Which sentences were scored: a digest of the dev sources, in order.
            "sources_sha1": self.sources_sha1,
            "seconds": round(time.monotonic() - start, 1),
        }
        if self.writes:
            with self.history_path.open("a") as file:
                file.write(json.dumps(entry) + "\n")
        # Process 0's decision everywhere: every process then saves (or not) at this step.
        improved = self.agree(score.score > self.best)
        if improved:
            self.best = score.score
            self.since_best = 0
            if self.writes:
                distributed.save_weights(
                    self.model, self.model_dir / layout.BEST, writes=self.writes
                )
        else:
            self.since_best += 1
        if self.writes:
            print(
                f"dev BLEU {score.score:.2f} at step {step} ({entry['seconds']} s)"
                + (" - new best" if improved else f" - best {self.best:.2f}"),
                flush=True,
            )
        if self.agree(bool(self.patience) and self.since_best >= self.patience):
            if self.writes:
                print(f"early stopping: no BLEU gain in {self.patience} evaluations", flush=True)
            self.stopped_early = True
            self.model.stop_training = True


class RunComplete(Exception):
    """Raised by `TrainingBudget` when training starts (or resumes) with nothing left to do."""

    def __init__(self, step, reason):
        super().__init__(f"training is complete at step {step} ({reason})")
        self.step = step
        self.reason = reason


class TrainingBudget(UpdateCallback):
    """Stops at `max_steps` optimizer steps or after `max_seconds` of training, across resumes.

    The seconds already spent are kept in `train_clock.json` next to the backup, written when
    the backup is, so a resumed run continues the same budget instead of starting a new one.
    `reason` says why training stopped (`"max_steps"`, `"max_minutes"`, or `None`).

    Keras trains at least one batch once `fit` starts, so a run whose restored state is
    already at its budget (killed after its last backup, before it was marked complete) would
    train past it: `on_train_begin`, after `BackupAndRestore`, raises `RunComplete` instead.
    """

    def __init__(
        self, model_dir, max_steps, max_seconds=None, save_every_steps=500, agree=bool, writes=True
    ):
        super().__init__()
        # `agree`: in a multi-process run, process 0's clock decides for every process (each
        # would otherwise stop at its own moment and leave the others waiting); `writes`:
        # only process 0 writes the clock file.
        self.agree = agree
        self.writes = writes
        self.path = Path(model_dir) / "train_clock.json"
        self.max_steps = int(max_steps)
        self.max_seconds = max_seconds
        self.save_every_steps = _positive_steps("save_every_steps", save_every_steps)
        self.elapsed_before = self.load()
        self.reason = None

    def load(self):
        if self.path.is_file():
            return float(json.loads(self.path.read_text())["seconds"])
        return 0.0

    def elapsed(self):
        return self.elapsed_before + time.monotonic() - self.start

    def stop_reason(self, step):
        """`"max_steps"` or `"max_minutes"` when the budget is spent at `step`, else `None`."""
        if step >= self.max_steps:
            return "max_steps"
        if self.max_seconds is not None and self.agree(self.elapsed() >= self.max_seconds):
            return "max_minutes"
        return None

    def progress(self, step):
        """The fraction of the budget spent at `step`: of the steps or of the seconds, whichever
        is further along (the one that will stop the run)."""
        spent = step / self.max_steps
        if self.max_seconds is not None:
            spent = max(spent, self.elapsed() / self.max_seconds)
        return min(spent, 1.0)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.start = time.monotonic()
        step = self.current_step()
        self.reason = self.stop_reason(step)
        if self.reason:
            raise RunComplete(step, self.reason)

    def on_train_batch_end(self, batch, logs=None):
        step = self.completed_update()
        if step is None:
            return
        if step % self.save_every_steps == 0:
            self.save(step)
        self.reason = self.stop_reason(step)
        if self.reason:
            if self.writes:
                print(f"stopping at step {step}: {self.reason} reached", flush=True)
            self.model.stop_training = True

    def save(self, step):
        if self.writes:
            self.path.write_text(json.dumps({"seconds": self.elapsed(), "step": step}))

    def on_train_end(self, logs=None):
        self.save(self.current_step())


class Cooldown(UpdateCallback):
    """Lowers the learning rate linearly to 0 over the last `fraction` of the training budget.

    The budget is `TrainingBudget`'s: `max_steps` or `max_minutes`, whichever ends first. A
    time budget's number of steps is not known in advance (it depends on the machine), so a
    schedule of the step alone cannot end at 0 when the clock does; before every batch this
    sets the optimizer's `rate_multiplier` (`keras_transformer.optimizers.Adam`) to
    `min(1, (1 - progress) / fraction)`. The schedule's rate is used unchanged until the
    cooldown starts. A resumed run continues from its saved clock.

    Args:
        budget: the run's `TrainingBudget` (listed before this callback).
        fraction: in (0, 1); e.g. 0.3 cools down over the last 30% of the budget.
        share: in a multi-process run, process 0's value of a float for every process (each
            process would otherwise read its own clock and the replicas' rates would differ).
    """

    def __init__(self, budget, fraction, share=float):
        super().__init__()
        if isinstance(fraction, bool) or not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"cooldown fraction must be in (0, 1), got {fraction!r}")
        self.budget = budget
        self.fraction = float(fraction)
        self.share = share
        self.multiplier = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        if getattr(optimizer, "rate_multiplier", None) is None:
            raise ValueError(
                "a cooldown needs an optimizer with a rate_multiplier variable "
                "(keras_transformer.optimizers.Adam(rate_multiplier=True)), got "
                f"{type(optimizer).__name__}"
            )
        self.variable = optimizer.rate_multiplier
        self.multiplier = None

    def on_train_batch_begin(self, batch, logs=None):
        progress = self.share(self.budget.progress(self.current_step()))
        multiplier = min(1.0, max(0.0, (1.0 - progress) / self.fraction))
        if multiplier == self.multiplier:
            return
        # On JAX the trainer keeps variable values in its own state between steps; reading
        # `self.model` (in current_step) synced that state out, so the next step reads this
        # assignment back in.
        self.variable.assign(multiplier)
        self.multiplier = multiplier


class TokenCount(keras.metrics.Metric):
    """Non-padding target tokens seen in the current epoch (read by `ProgressLogger`).

    Also records, in `traced_shapes`, the static label shapes it is traced with: Python runs
    `update_state` once per trace of the train step, so on JAX (and with `jit_compile`) that
    is one entry per compiled program. Shapes with unknown dimensions (Keras' symbolic build,
    TensorFlow's relaxed retracing) are kept too; they are traces, not batch shapes.
    """

    def __init__(self, pad_id=0, name="target_tokens", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = int(pad_id)
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")
        self.traced_shapes = set()

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.traced_shapes.add(tuple(y_true.shape))
        mask = keras.ops.not_equal(y_true, self.pad_id)
        self.count.assign_add(keras.ops.sum(keras.ops.cast(mask, "float32")))

    def result(self):
        # A tensor, not the variable: JAX refuses to trace a Variable returned from a metric.
        return keras.ops.convert_to_tensor(self.count)

    def reset_state(self):
        self.count.assign(0.0)
