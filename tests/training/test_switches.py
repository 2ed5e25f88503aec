"""Every training switch trains in a test, with an assertion that can fail (issue 9).

Mixed precision, gradient accumulation, the mirrored strategy, `jit_compile`, early stopping,
checkpoint pruning and TensorBoard logs, each on a tiny run of `training.train.train` (one
encoder and one decoder layer, a vocabulary trained once for the module, a few steps).
"""

import json
import math

import h5py
import keras
import numpy as np
import pytest

from keras_transformer import (
    MaskedLabelSmoothingLoss,
    TransformerConfig,
    build_transformer,
    transformer_optimizer,
)
from keras_transformer.translation import model_dir as layout
from tests.subprocess_report import run_script
from tests.training.switch_runs import logged_steps, tensorboard_scalars, train_tiny

# Checked on TensorFlow, the suite's backend: `strategy: mirrored` and `jit_compile` are
# TensorFlow's switches (JAX compiles every step anyway).
pytestmark = pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="the switch runs are checked on TensorFlow"
)

VOCAB_SIZE = 300  # the tiny config's


@pytest.fixture(scope="module")
def vocab(tmp_path_factory, shared_data_dir):
    """The tiny config's 300-piece vocabulary, trained once (every run copies it)."""
    from training.corpus import corpus_from_config
    from training.vocab import train_vocab

    prefix = tmp_path_factory.mktemp("vocab") / "spm"
    corpus = corpus_from_config({"spec": f"text:{shared_data_dir}/multi30k/val"}, "en", "de")
    train_vocab(corpus, prefix, vocab_size=VOCAB_SIZE, sample_size=20000, seed=1)
    return prefix.with_suffix(".model")


def _assert_loss_falls(run):
    losses = run.epoch_losses
    assert all(math.isfinite(loss) for loss in losses), losses
    # Epoch means over different batches wobble by a few hundredths; 12 steps of warm-up
    # take the tiny model from ln(300) ~ 5.7 down by several tenths.
    assert losses[-1] < losses[0] - 0.2, losses


# --- gradient accumulation ---------------------------------------------------------------


def _fixed_batches(rows, vocab_size, real_lengths, seed=0):
    """Token ids whose every group of `len(real_lengths)` rows has the same real tokens."""
    rng = np.random.default_rng(seed)
    source_ids = rng.integers(4, vocab_size, (rows, 7))
    target_ids = rng.integers(4, vocab_size, (rows, 6))
    labels = rng.integers(4, vocab_size, (rows, 6))
    for row in range(rows):
        length = real_lengths[row % len(real_lengths)]
        target_ids[row, length:] = labels[row, length:] = 0
    return {"source_ids": source_ids, "target_ids": target_ids}, labels


def _compiled_tiny_model(config, accumulation_steps, initial_weights=None):
    model = build_transformer(config)
    if initial_weights is not None:
        model.set_weights(initial_weights)
    model.compile(
        optimizer=transformer_optimizer(
            config.d_model, warmup_steps=10, gradient_accumulation_steps=accumulation_steps
        ),
        loss=MaskedLabelSmoothingLoss(config.label_smoothing),
        run_eagerly=True,  # two tiny updates: eager is faster than tracing the train step
    )
    return model


def test_accumulated_updates_equal_updates_on_the_whole_batch():
    """k micro-batches of b rows then one update == one update on the k*b rows, twice.

    The loss is a mean over real tokens and Keras averages the micro-batches' gradients, so
    the two agree when every micro-batch holds as many real tokens: here each has rows with
    6, 3 and 4 target tokens. Two updates, because Adam's first one is `lr * sign(gradient)`
    and would not see a gradient scaled wrong; the learning rate of the warm-up is seen in
    both (counted in micro-batches it would be k times too high).
    """
    k, b = 2, 3
    config = TransformerConfig.preset(
        "tiny", vocab_size=40, num_encoder_layers=1, num_decoder_layers=1, label_smoothing=0.1
    )
    assert config.dropout == 0.0
    inputs, labels = _fixed_batches(2 * k * b, config.vocab_size, real_lengths=(6, 3, 4))
    keras.utils.set_random_seed(0)
    accumulated = _compiled_tiny_model(config, k)
    initial = accumulated.get_weights()
    whole = _compiled_tiny_model(config, None, initial_weights=initial)

    accumulated.fit(inputs, labels, batch_size=b, shuffle=False, verbose=0)
    whole.fit(inputs, labels, batch_size=k * b, shuffle=False, verbose=0)

    assert int(accumulated.optimizer.iterations) == int(whole.optimizer.iterations) == 2
    assert float(accumulated.optimizer.learning_rate) == float(whole.optimizer.learning_rate)
    for variable, expected, before in zip(accumulated.weights, whole.weights, initial, strict=True):
        after = expected.numpy()
        assert np.abs(after - before).max() > 1e-3, f"{variable.path} did not move"
        if variable.path.endswith("key/bias"):
            # Softmax ignores a bias added to every key, so its gradient is float rounding
            # noise, which Adam scales up to a full step in a random direction.
            continue
        np.testing.assert_allclose(variable.numpy(), after, atol=1e-5, err_msg=variable.path)
    np.testing.assert_allclose(
        accumulated.predict(inputs, verbose=0), whole.predict(inputs, verbose=0), atol=1e-5
    )


def test_accumulation_run_counts_optimizer_updates(tmp_path, vocab, shared_data_dir):
    """max_steps, save_every_steps and the progress line count updates of 2 micro-batches."""
    run = train_tiny(
        tmp_path / "run",
        vocab,
        shared_data_dir,
        "train.gradient_accumulation_steps=2",
        "train.max_steps=6",
        "train.steps_per_epoch=3",
        "train.save_every_steps=3",
        "train.log_every_steps=3",
    )
    steps = [step for step, _ in layout.list_step_checkpoints(run.model_dir)]
    assert (run.summary["steps"], steps, logged_steps(run.output)) == (6, [3, 6], [3, 6]), (
        run.output
    )


# --- mixed precision, jit_compile ---------------------------------------------------------


def test_mixed_bfloat16_trains_float32_variables_into_float32_checkpoints(
    tmp_path, vocab, shared_data_dir
):
    try:
        run = train_tiny(
            tmp_path / "run", vocab, shared_data_dir, "train.mixed_precision=mixed_bfloat16"
        )
    finally:
        # train() sets the global policy; the float32 model below and later tests need it back.
        keras.mixed_precision.set_global_policy("float32")
    mixed = run.model
    assert mixed.dtype_policy.name == "mixed_bfloat16" and mixed.compute_dtype == "bfloat16"
    _assert_loss_falls(run)
    assert {variable.dtype for variable in mixed.weights} == {"float32"}

    checkpoint = layout.list_step_checkpoints(run.model_dir)[-1][1]
    with h5py.File(checkpoint) as file:
        dtypes = {}
        file.visititems(
            lambda name, item: (
                dtypes.setdefault(str(item.dtype), name) if isinstance(item, h5py.Dataset) else None
            )
        )
    # Integers are the layers' seed-generator states; every real number is a float32.
    assert {dtype for dtype in dtypes if not dtype.startswith("int")} == {"float32"}, dtypes

    restored, _ = layout.load_transformer(run.model_dir, checkpoint=str(checkpoint))
    assert restored.compute_dtype == "float32"
    for variable, trained in zip(restored.weights, mixed.weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), trained.numpy(), err_msg=variable.path)
    inputs, _ = _fixed_batches(4, VOCAB_SIZE, real_lengths=(5, 2))
    logits32 = keras.ops.convert_to_numpy(restored(inputs))
    logits16 = keras.ops.convert_to_numpy(keras.ops.cast(mixed(inputs), "float32"))
    # bf16 keeps 8 bits of mantissa: logits of a few units agree to a few hundredths.
    np.testing.assert_allclose(logits16, logits32, atol=0.1)
    assert np.abs(logits16 - logits32).max() > 0, "the mixed model did not compute in bf16"


def test_jit_compile_trains_on_tensorflow(tmp_path, vocab, shared_data_dir):
    """XLA on the pipeline's fixed batch shapes; one bucket (`length_multiple` = `max_length`),
    as each shape costs an XLA compilation of ~20 s here."""
    run = train_tiny(
        tmp_path / "run",
        vocab,
        shared_data_dir,
        "train.jit_compile=true",
        "data.length_multiple=48",
    )
    assert "batch shapes (rows, length): 1 fixed: 10x48" in run.output, run.output
    assert run.model.jit_compile is True
    assert run.summary["steps"] == 12
    _assert_loss_falls(run)


# --- early stopping, keep_checkpoints, TensorBoard -----------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, vocab, shared_data_dir):
    """A run whose dev BLEU cannot improve (its learning rate is ~0, so every greedy decode
    is the same): evaluations at steps 2 (the first best), 4 and 6, then early stopping.

    It also keeps 2 of its step checkpoints and logs to TensorBoard every step.
    """
    return train_tiny(
        tmp_path_factory.mktemp("stopped") / "run",
        vocab,
        shared_data_dir,
        "train.learning_rate_scale=1.0e-9",
        "train.max_steps=20",
        "train.eval_every_steps=2",
        "train.eval_sentences=4",
        "train.early_stopping_patience=2",
        "train.save_every_steps=2",
        "train.keep_checkpoints=2",
        "train.log_every_steps=1",
    )


def test_early_stopping_after_patience_evaluations_without_gain(stopped_run):
    history = [
        json.loads(line)
        for line in (stopped_run.model_dir / layout.EVAL_HISTORY).read_text().splitlines()
    ]
    assert [entry["step"] for entry in history] == [2, 4, 6]
    assert len({entry["bleu"] for entry in history}) == 1, history
    assert stopped_run.summary["steps"] == 6
    assert "early stopping: no BLEU gain in 2 evaluations" in stopped_run.output


def test_keep_checkpoints_leaves_the_newest(stopped_run):
    steps = [step for step, _ in layout.list_step_checkpoints(stopped_run.model_dir)]
    assert steps == [4, 6]


def test_tensorboard_logs_the_loss_of_every_step(stopped_run):
    scalars = tensorboard_scalars(stopped_run.model_dir / layout.LOGS)
    assert sorted(scalars["batch_loss"]) == [1, 2, 3, 4, 5, 6], sorted(scalars)
    assert all(math.isfinite(loss) for loss in scalars["batch_loss"].values())
    # One value per Keras epoch (4 steps, then the 2 before the stop), as `fit` reported them.
    epoch_losses = [scalars["epoch_loss"][epoch] for epoch in sorted(scalars["epoch_loss"])]
    np.testing.assert_allclose(epoch_losses, stopped_run.epoch_losses, rtol=1e-6)


# --- mirrored strategy ----------------------------------------------------------------------

MIRRORED_SCRIPT = r"""
import json, sys
import tensorflow as tf

# Two logical CPU devices, configured before TensorFlow initialises.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tests.training.switch_runs import tensorboard_scalars, train_tiny

model_dir, vocab, data_dir = sys.argv[1:4]
run = train_tiny(model_dir, vocab, data_dir, *sys.argv[4:])
print(json.dumps({
    "replicas": run.model.distribute_strategy.num_replicas_in_sync,
    "steps": run.summary["steps"],
    "epoch_losses": run.epoch_losses,
    "batch_loss": tensorboard_scalars(run.model_dir / "logs")["batch_loss"],
}))
"""


def test_mirrored_strategy_trains_with_the_single_device_loss(
    tmp_path, vocab, shared_data_dir, stopped_run
):
    """Two replicas: the first step's loss is the one-device loss of the same global batch
    (the stopped run's: same seed, data and model), and the loss falls."""
    report = run_script(
        MIRRORED_SCRIPT,
        str(tmp_path / "run"),
        str(vocab),
        str(shared_data_dir),
        "train.strategy=mirrored",
        "train.max_steps=8",
        "train.log_every_steps=1",
        timeout=600,
    )
    assert report["replicas"] == 2
    assert report["steps"] == 8
    single_device = tensorboard_scalars(stopped_run.model_dir / layout.LOGS)["batch_loss"][1]
    # Keras reports the mean of the two replicas' per-token means, not the mean over the batch's
    # tokens: with unequal real tokens per replica they differ (by 6e-5 relative here); twice
    # the loss (a missed division by the replicas) or another batch is far outside 1e-3.
    assert report["batch_loss"]["1"] == pytest.approx(single_device, rel=1e-3)
    assert report["epoch_losses"][-1] < report["epoch_losses"][0] - 0.2, report


# --- the run's own logs, as the curves command plots them ------------------------------------


def test_progress_log_and_curves_of_a_real_run(stopped_run, tmp_path):
    """`progress.jsonl` holds every progress line (steps 1..6 here, with the printed loss) and
    `training.curves` plots it with the dev BLEU of `bleu_history.jsonl`. Catches a progress
    log that is not written or misses steps, and figures whose lines are not the run's."""
    from training import curves

    data = curves.curves(stopped_run.model_dir)
    assert data["loss"]["step"].tolist() == logged_steps(stopped_run.output) == [1, 2, 3, 4, 5, 6]
    assert np.all(np.diff(data["loss"]["seconds"]) >= 0)
    assert data["bleu"]["step"].tolist() == [2, 4, 6]
    figures = curves.curve_figures(data)
    assert set(figures) == {"curves_by_step", "curves_by_time"}
    panels = figures["curves_by_step"].axes
    assert [axis.get_title() for axis in panels] == [title for _, title in curves.PANELS]
    for axis, (key, _) in zip(panels, curves.PANELS, strict=True):
        (line,) = axis.get_lines()
        np.testing.assert_allclose(line.get_ydata(), data[key]["value"])
    argv = ["--model-dir", str(stopped_run.model_dir), "--output-dir", str(tmp_path)]
    assert curves.main(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "curves_by_step.png",
        "curves_by_time.png",
    ]
