"""Label-smoothed loss, token accuracy and the §5.3 schedule against direct formulas."""

import keras
import numpy as np
import pytest

from keras_transformer import MaskedLabelSmoothingLoss, MaskedTokenAccuracy, TransformerSchedule


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


def test_loss_config_round_trip():
    loss = MaskedLabelSmoothingLoss(label_smoothing=0.2, pad_id=5)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (restored.label_smoothing, restored.pad_id) == (0.2, 5)


def test_token_accuracy_counts_only_real_tokens():
    metric = MaskedTokenAccuracy()
    labels = np.array([[5, 6, 0, 0], [7, 0, 0, 0]])
    logits = np.zeros((2, 4, 9), "float32")
    logits[0, 0, 5] = logits[0, 1, 1] = logits[1, 0, 7] = 1.0  # 2 of 3 real tokens right
    logits[0, 2, 0] = 1.0  # a "right" prediction on padding must not count
    metric.update_state(labels, logits)
    assert float(metric.result()) == pytest.approx(2 / 3)


def test_schedule_follows_the_paper():
    schedule = TransformerSchedule(d_model=512, warmup_steps=4000)
    rate = lambda step: float(schedule(step - 1))  # noqa: E731 - the paper counts from 1
    assert rate(1) == pytest.approx(512**-0.5 * 4000**-1.5)
    assert rate(4000) == pytest.approx(512**-0.5 * 4000**-0.5)
    assert rate(16000) == pytest.approx(512**-0.5 * 16000**-0.5)
    assert rate(2000) < rate(4000) > rate(8000)
    assert TransformerSchedule(**schedule.get_config()).get_config() == schedule.get_config()
