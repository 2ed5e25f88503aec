"""Label-smoothed cross-entropy that ignores padding, and a padding-aware token accuracy."""

import keras
from keras import ops


def label_smoothed_token_losses(labels, logits, label_smoothing=0.1):
    """Per-token cross-entropy against `(1 - eps) * one_hot + eps / vocab`, shape `[batch, length]`.

    Computed as `logsumexp(z) - (1 - eps) * z_y - eps * mean(z)`, so no one-hot (or log-softmax)
    `[batch, length, vocab]` tensor is materialised beyond the logits themselves.
    """
    logits = ops.cast(logits, "float32")
    labels = ops.cast(labels, "int32")
    log_normalizer = ops.logsumexp(logits, axis=-1)
    label_logits = ops.squeeze(ops.take_along_axis(logits, labels[..., None], axis=-1), -1)
    losses = log_normalizer - (1.0 - label_smoothing) * label_logits
    if label_smoothing:
        losses = losses - label_smoothing * ops.mean(logits, axis=-1)
    return losses


@keras.saving.register_keras_serializable(package="keras_transformer")
class MaskedLabelSmoothingLoss(keras.losses.Loss):
    """Mean label-smoothed cross-entropy over the non-padding target tokens of a batch.

    The mean is over real tokens, not over `batch * length`, so a batch with more padding does
    not get a smaller loss. `sample_weight` (`[batch]` or `[batch, length]`) multiplies tokens.

    Args:
        label_smoothing: `eps_ls`, 0.1 in the paper.
        pad_id: label id to ignore.

    Call arguments:
        y_true: int labels `[batch, length]`.
        y_pred: logits `[batch, length, vocab]`.

    Returns:
        A scalar.
    """

    def __init__(
        self, label_smoothing=0.1, pad_id=0, name="label_smoothed_cross_entropy", **kwargs
    ):
        super().__init__(name=name, reduction="sum", **kwargs)
        self.label_smoothing = float(label_smoothing)
        self.pad_id = int(pad_id)

    def call(self, y_true, y_pred):
        losses = label_smoothed_token_losses(y_true, y_pred, self.label_smoothing)
        return losses * ops.cast(ops.not_equal(y_true, self.pad_id), losses.dtype)

    def __call__(self, y_true, y_pred, sample_weight=None):
        weights = ops.cast(ops.not_equal(y_true, self.pad_id), "float32")
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, "float32")
            if len(sample_weight.shape) == 1:
                sample_weight = sample_weight[:, None]
            weights = weights * sample_weight
        losses = label_smoothed_token_losses(y_true, y_pred, self.label_smoothing)
        return ops.sum(losses * weights) / ops.maximum(ops.sum(weights), 1.0)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        config.update(label_smoothing=self.label_smoothing, pad_id=self.pad_id)
        return config


@keras.saving.register_keras_serializable(package="keras_transformer")
class MaskedTokenAccuracy(keras.metrics.Metric):
    """Share of non-padding target tokens whose arg-max prediction is right."""

    def __init__(self, pad_id=0, name="token_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = int(pad_id)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, "int32")
        mask = ops.cast(ops.not_equal(y_true, self.pad_id), "float32")
        hits = ops.cast(
            ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y_true), "float32"
        )
        self.correct.assign_add(ops.sum(hits * mask))
        self.total.assign_add(ops.sum(mask))

    def result(self):
        return self.correct / ops.maximum(self.total, 1.0)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}
