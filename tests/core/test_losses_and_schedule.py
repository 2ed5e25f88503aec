"""Label-smoothed loss, token accuracy and the §5.3 schedule against direct formulas."""

import json

import keras
import numpy as np
import pytest

from keras_transformer import MaskedLabelSmoothingLoss, MaskedTokenAccuracy, TransformerSchedule
from tests.subprocess_report import run_script


def _reference_loss(labels, logits, epsilon, pad_id=0):
    vocab = logits.shape[-1]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    smoothed = np.full(logits.shape, epsilon / vocab)
    smoothed += (1 - epsilon) * np.eye(vocab)[labels]
    token_losses = -(smoothed * log_probs).sum(-1)
    mask = labels != pad_id
    return (token_losses * mask).sum() / mask.sum()


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_loss_matches_one_hot_formula_and_ignores_padding(epsilon):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype("float32")
    labels = rng.integers(1, 11, (3, 5))
    labels[0, 3:] = 0
    labels[2, 1:] = 0
    loss = MaskedLabelSmoothingLoss(label_smoothing=epsilon)
    value = float(loss(labels, logits))
    assert value == pytest.approx(_reference_loss(labels, logits, epsilon), rel=1e-5)
    # Padding positions may hold anything: the loss does not see them.
    logits[2, 1:] = 100.0
    assert float(loss(labels, logits)) == pytest.approx(value, rel=1e-5)
    # More padding columns leave the per-token mean unchanged.
    wider_labels = np.pad(labels, ((0, 0), (0, 4)))
    wider_logits = np.pad(logits, ((0, 0), (0, 4), (0, 0)))
    assert float(loss(wider_labels, wider_logits)) == pytest.approx(value, rel=1e-5)


def _padded_batch(lengths=(6, 3, 1, 4), seed=0):
    """Logits `[4, 6, 11]` and labels with `lengths` real tokens per row (pad id 0)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(4, 6, 11)).astype("float32") * 3.0
    labels = rng.integers(1, 11, (4, 6))
    for row, length in enumerate(lengths):
        labels[row, length:] = 0
    return labels, logits


def _identity_logits_model(vocab):
    """Returns its input as logits through one trainable layer, so `fit` has weights to update."""
    inputs = keras.Input((None, vocab))
    outputs = keras.layers.Dense(vocab, kernel_initializer="identity", name="logits")(inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_compile_fit_and_evaluate_report_the_formula(epsilon):
    labels, logits = _padded_batch()
    expected = _reference_loss(labels, logits, epsilon)
    model = _identity_logits_model(logits.shape[-1])
    model.compile(optimizer="sgd", loss=MaskedLabelSmoothingLoss(label_smoothing=epsilon))
    assert model.evaluate(logits, labels, batch_size=4, verbose=0) == pytest.approx(
        expected, rel=1e-6
    )
    # One batch, one step: `fit` reports the loss of the weights before the update.
    history = model.fit(logits, labels, batch_size=4, epochs=1, verbose=0).history
    assert history["loss"] == [pytest.approx(expected, rel=1e-6)]


def test_reductions_and_sample_weight_count_only_real_tokens():
    labels, logits = _padded_batch()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_losses = -log_probs[np.arange(4)[:, None], np.arange(6), labels]
    mask = labels != 0
    row_weights = np.array([[1.0], [2.0], [0.0], [0.5]])
    weights = row_weights * mask

    def loss(reduction, **kwargs):
        fn = MaskedLabelSmoothingLoss(label_smoothing=0.0, reduction=reduction)
        return keras.ops.convert_to_numpy(fn(labels, logits, **kwargs))

    # float32: the loss is a difference of terms near 10, so 1e-6 absolute is its precision.
    np.testing.assert_allclose(loss("none"), token_losses * mask, rtol=1e-6, atol=1e-6)
    assert float(loss("sum")) == pytest.approx((token_losses * mask).sum(), rel=1e-6)
    sample_weight = {"sample_weight": row_weights}
    # Keras' convention: sample weights multiply token losses; the mean is over real tokens.
    assert float(loss("sum_over_batch_size", **sample_weight)) == pytest.approx(
        (token_losses * weights).sum() / mask.sum(), rel=1e-6
    )
    assert float(loss("mean_with_sample_weight", **sample_weight)) == pytest.approx(
        (token_losses * weights).sum() / weights.sum(), rel=1e-6
    )


def test_loss_is_float32_under_mixed_bfloat16():
    labels, logits = _padded_batch()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _identity_logits_model(logits.shape[-1])
        bf16_logits = model(logits)
        assert bf16_logits.dtype == "bfloat16"
        loss = MaskedLabelSmoothingLoss(label_smoothing=0.1)
        value = loss(labels, bf16_logits)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert value.dtype == "float32"
    # The formula on the bf16-rounded logits, to float32 precision (a bf16 sum is off by ~1e-2).
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(bf16_logits, "float32"))
    assert float(value) == pytest.approx(_reference_loss(labels, rounded, 0.1), rel=1e-6)


def test_loss_config_round_trip():
    loss = MaskedLabelSmoothingLoss(label_smoothing=0.2, pad_id=5, reduction="sum")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is MaskedLabelSmoothingLoss
    assert (restored.label_smoothing, restored.pad_id, restored.reduction) == (0.2, 5, "sum")
    assert restored.get_config() == loss.get_config()


def test_token_accuracy_counts_only_real_tokens():
    metric = MaskedTokenAccuracy()
    labels = np.array([[5, 6, 0, 0], [7, 0, 0, 0]])
    logits = np.zeros((2, 4, 9), "float32")
    logits[0, 0, 5] = logits[0, 1, 1] = logits[1, 0, 7] = 1.0  # 2 of 3 real tokens right
    logits[0, 2, 0] = 1.0  # a "right" prediction on padding must not count
    metric.update_state(labels, logits)
    assert float(metric.result()) == pytest.approx(2 / 3)


def test_token_accuracy_counts_a_label_tied_for_the_highest_score():
    # An arg-max picks the lowest of tied ids (3 here): the label 5 would be a miss.
    metric = MaskedTokenAccuracy()
    logits = np.zeros((1, 2, 9), "float32")
    logits[0, 0, [3, 5]] = 2.0
    logits[0, 1, 8] = 1.0
    metric.update_state(np.array([[5, 7]]), logits)
    assert float(metric.result()) == pytest.approx(1 / 2)


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_the_training_step_takes_no_arg_max_over_the_logits(kernels, monkeypatch):
    """The accuracy reuses the loss's maximum; an arg-max over `[batch, length, vocab]` was
    4-5% of the bf16 `small` step. With the native kernels (`losses_tf`) both ask
    `KerasTransformerLogitStatistics` (that it then runs once per step is counted in
    `tests/core/test_native_kernels.py`), and under `mixed_bfloat16` both kernels take the
    bf16 logits, not the float32 copy Keras makes for the loss; without them, a `Max` of the
    same cast."""
    import tensorflow as tf

    from keras_transformer import TransformerConfig, build_transformer
    from keras_transformer.kernels import native

    if keras.config.backend() != "tensorflow":
        pytest.skip("inspects a TensorFlow graph")
    monkeypatch.setenv(native.SWITCH, kernels)
    if kernels == "1" and native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    config = TransformerConfig.preset("tiny")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_transformer(config)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.compile(
        optimizer="adam",
        loss=MaskedLabelSmoothingLoss(0.1),
        metrics=[MaskedTokenAccuracy()],
    )
    ids = tf.ones([2, 5], tf.int32)
    step = tf.function(model.train_step).get_concrete_function(
        ({"source_ids": ids, "target_ids": ids}, ids)
    )
    graph = step.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    ops = [node.op for node in graph.node]
    ops += [node.op for function in graph.library.function for node in function.node_def]
    assert "ArgMax" not in ops
    if kernels == "1":
        assert ops.count("KerasTransformerLogitStatistics") == 2  # the loss's and the metric's
        assert ops.count("KerasTransformerSmoothedCrossEntropyGrad") == 1
        assert "Max" not in ops and "Exp" not in ops
        kernel_types = {
            tf.dtypes.as_dtype(node.attr["T"].type).name
            for node in nodes
            if node.op.startswith("KerasTransformer")
        }
        assert kernel_types == {"bfloat16"}
    else:
        assert "Max" in ops and "KerasTransformerLogitStatistics" not in ops


def test_schedule_follows_the_paper():
    schedule = TransformerSchedule(d_model=512, warmup_steps=4000)
    rate = lambda step: float(schedule(step - 1))  # noqa: E731 - the paper counts from 1
    assert rate(1) == pytest.approx(512**-0.5 * 4000**-1.5)
    assert rate(4000) == pytest.approx(512**-0.5 * 4000**-0.5)
    assert rate(16000) == pytest.approx(512**-0.5 * 16000**-0.5)
    assert rate(2000) < rate(4000) > rate(8000)


def test_schedule_config_round_trip_gives_the_same_rates():
    # Values other than the defaults, so an argument left out of `get_config` changes the rates.
    schedule = TransformerSchedule(d_model=64, warmup_steps=37, scale=3.0)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert type(restored) is TransformerSchedule
    for step in (0, 36, 37, 500):
        assert float(restored(step)) == float(schedule(step))


MIRRORED_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_transformer import MaskedLabelSmoothingLoss

batch = json.loads(sys.argv[1])
logits, labels = np.array(batch["logits"], "float32"), np.array(batch["labels"])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    inputs = keras.Input((None, logits.shape[-1]))
    outputs = keras.layers.Dense(logits.shape[-1], kernel_initializer="identity")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss=MaskedLabelSmoothingLoss(label_smoothing=0.1))
evaluated = model.evaluate(logits, labels, batch_size=4, verbose=0)
fitted = model.fit(logits, labels, batch_size=4, shuffle=False, verbose=0).history["loss"][0]
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "evaluate": evaluated,
                  "fit": fitted}))
"""


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="tf.distribute only")
def test_mirrored_strategy_reports_the_formula():
    """Under `tf.distribute` Keras divides each replica's loss by the number of replicas before
    summing gradients; a loss that reduces by itself outside `Loss.__call__` misses that scaling
    and reports (and trains on) the loss times the number of replicas."""
    # 8 real tokens on each replica, so the mean of the replicas' means is the global mean.
    labels, logits = _padded_batch(lengths=(6, 2, 3, 5))
    batch = json.dumps({"logits": logits.tolist(), "labels": labels.tolist()})
    report = run_script(MIRRORED_SCRIPT, batch)
    expected = _reference_loss(labels, logits, 0.1)
    assert report["replicas"] == 2
    assert report["evaluate"] == pytest.approx(expected, rel=1e-6)
    assert report["fit"] == pytest.approx(expected, rel=1e-6)


GRADIENT_SCRIPT = """
import json, sys
import numpy as np
import keras
from keras_transformer import MaskedLabelSmoothingLoss
batch = json.loads(sys.argv[1])
logits, labels = np.array(batch["logits"], "float32"), np.array(batch["labels"], "int32")
loss = MaskedLabelSmoothingLoss(label_smoothing=0.1)
if keras.config.backend() == "jax":
    import jax
    gradient = jax.jit(jax.grad(lambda z: loss(labels, z)))(logits)
else:
    import tensorflow as tf
    z = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = loss(labels, z)
    gradient = tape.gradient(value, z)
print(json.dumps({"gradient": np.asarray(gradient).tolist()}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_loss_gradient_is_softmax_minus_the_smoothed_target_over_real_tokens(backend):
    """The loss's hand-written gradient (`label_smoothed_token_losses`) against the formula:
    `(softmax(z) - (1 - eps) one_hot(y) - eps / V) / real tokens` at real tokens, 0 at padding."""
    labels, logits = _padded_batch()
    batch = json.dumps({"logits": logits.tolist(), "labels": labels.tolist()})
    gradient = np.array(run_script(GRADIENT_SCRIPT, batch, backend=backend)["gradient"])
    vocab, mask = logits.shape[-1], labels != 0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    target = 0.9 * np.eye(vocab)[labels] + 0.1 / vocab
    expected = (probs - target) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(gradient, expected, atol=1e-6)
