"""Label-smoothed cross-entropy that ignores padding, and a padding-aware token accuracy."""

import keras
from keras import ops

# Keras 3 has no public setter for the mask that `keras.losses.Loss.__call__` reads from the
# per-token losses (its own layers use this one). Imported at module level so that a Keras
# release that moves it fails at import, not by silently averaging over padding.
from keras.src.backend import set_keras_mask


def label_smoothed_token_losses(labels, logits, label_smoothing=0.1):
    """Per-token cross-entropy against `(1 - eps) * one_hot + eps / vocab`, shape `[batch, length]`.

    The loss is `logsumexp(z) - (1 - eps) * z_y - eps * mean(z)` and its gradient with respect
    to the logits is `softmax(z) - (1 - eps) * one_hot(y) - eps / vocab`, computed here from
    the softmax that the forward pass already made, the one-hot part as one value added per
    token (no one-hot tensor is made). Left to automatic
    differentiation, the same loss costs a scatter of the label gradient into a
    `[batch, length, vocab]` tensor (`UnsortedSegmentSum` on TensorFlow), a tiled logsumexp
    gradient and a broadcast mean gradient: in a profile of the `small` training step on a
    2-core CPU those took about 10% of the step (benchmarks/results/training_profile.md).

    Args:
        labels: int `[batch, length]`.
        logits: `[batch, length, vocab]`, any float dtype (the loss is computed in float32).
        label_smoothing: `eps`.

    Returns:
        float32 `[batch, length]`.

    On TensorFlow (CPU) the loss and its gradient are two compiled kernels
    (`keras_transformer.losses_tf`, one pass over the logits each); the `keras.ops` code below
    is what the other backends run, and TensorFlow where the kernels are unavailable.
    """
    labels = ops.cast(labels, "int32")
    if keras.config.backend() == "tensorflow":
        from keras_transformer import losses_tf

        fused = losses_tf.token_losses(labels, logits, label_smoothing)
        if fused is not None:
            return fused
    vocab_size = logits.shape[-1]
    smoothing = float(label_smoothing)

    # The labels are closed over rather than passed: they have no gradient, and a
    # custom-gradient function must return one for every argument on some backends.
    @ops.custom_gradient
    def token_losses(logits):
        logits32 = ops.cast(logits, "float32")
        shifted = logits32 - ops.max(logits32, axis=-1, keepdims=True)
        exp = ops.exp(shifted)
        total = ops.sum(exp, axis=-1)
        label_logits = ops.squeeze(ops.take_along_axis(shifted, labels[..., None], axis=-1), -1)
        losses = ops.log(total) - (1.0 - smoothing) * label_logits
        if smoothing:
            losses = losses - smoothing * ops.mean(shifted, axis=-1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # upstream * (softmax - eps / vocab) in two passes over [batch, length, vocab],
            # then -(1 - eps) * upstream added at each token's label: a scatter of one value
            # per token where a one-hot target cost three more full passes (loss and gradient
            # of bf16 [64, 24, 8000] logits: 21.3 -> 17.7 ms, alternating in one process).
            gradient = exp * (upstream / total)[..., None]
            if smoothing:
                gradient = gradient - (smoothing / vocab_size) * upstream[..., None]
            gradient = ops.scatter_update(
                gradient,
                label_coordinates(labels),
                ops.reshape(-(1.0 - smoothing) * upstream, (-1,)),
                reduction="add",
            )
            return ops.cast(gradient, logits.dtype)

        return losses, grad

    return token_losses(logits)


def label_coordinates(labels):
    """int32 `[batch * length, 3]`: `(row, position, label)` of every token of `labels`."""
    shape = ops.shape(labels)
    rows = ops.broadcast_to(ops.arange(shape[0], dtype="int32")[:, None], shape)
    positions = ops.broadcast_to(ops.arange(shape[1], dtype="int32")[None, :], shape)
    return ops.reshape(ops.stack([rows, positions, labels], axis=-1), (-1, 3))


@keras.saving.register_keras_serializable(package="keras_transformer")
class MaskedLabelSmoothingLoss(keras.losses.Loss):
    """Label-smoothed cross-entropy over the non-padding target tokens.

    `call` returns the per-token losses `[batch, length]` and attaches the mask
    `y_true != pad_id` to them; Keras' own reduction then drops the padding. With the default
    `reduction="sum_over_batch_size"` the result is the mean over real tokens,
    `sum(loss * sample_weight * mask) / sum(mask)`, not over `batch * length`, so a batch with
    more padding does not get a smaller loss. Going through `keras.losses.Loss.__call__` (rather
    than reducing here) also keeps Keras' scaling of the loss by the number of replicas under
    `tf.distribute`, and the float32 computation under a mixed-precision policy.

    The other reductions mean, for real tokens only: `"sum"` their sum; `"none"` the per-token
    losses with 0 at padding; `"mean_with_sample_weight"` the `sample_weight`-weighted mean
    `sum(loss * sample_weight * mask) / sum(sample_weight * mask)`.

    Args:
        label_smoothing: `eps_ls`, 0.1 in the paper.
        pad_id: label id to ignore.
        reduction: a Keras loss reduction; see above.

    Call arguments:
        y_true: int labels `[batch, length]`.
        y_pred: logits `[batch, length, vocab]`.
        sample_weight: optional, `[batch, 1]` or `[batch, length]`; multiplies the token losses.

    Returns:
        A float32 scalar (or `[batch, length]` with `reduction="none"`).
    """

    def __init__(
        self,
        label_smoothing=0.1,
        pad_id=0,
        reduction="sum_over_batch_size",
        name="label_smoothed_cross_entropy",
        **kwargs,
    ):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.label_smoothing = float(label_smoothing)
        self.pad_id = int(pad_id)

    def call(self, y_true, y_pred):
        # `Loss.__call__` has converted `y_true` to the loss dtype (float32: ids are exact up
        # to 2**24); `label_smoothed_token_losses` casts them back to int32.
        losses = label_smoothed_token_losses(y_true, y_pred, self.label_smoothing)
        set_keras_mask(losses, ops.not_equal(ops.cast(y_true, "int32"), self.pad_id))
        return losses

    def get_config(self):
        config = super().get_config()
        config.update(label_smoothing=self.label_smoothing, pad_id=self.pad_id)
        return config


def label_is_max(labels, logits):
    """Bool `[batch, length]`: whether each label's logit equals its row's maximum.

    The maximum is the one the loss computes (`label_smoothed_token_losses`: on TensorFlow the
    same kernel on the same tensor, else the same cast and max), so TensorFlow's graph
    optimizer computes it once for both.
    """
    labels = ops.cast(labels, "int32")
    if keras.config.backend() == "tensorflow":
        from keras_transformer import losses_tf

        fused = losses_tf.label_is_max(labels, logits)
        if fused is not None:
            return fused
    # Written as the loss writes its maximum (cast, then max over the vocabulary with kept
    # dims) so that the two are one op after common-subexpression elimination.
    scores = ops.cast(logits, "float32")
    best = ops.max(scores, axis=-1, keepdims=True)
    label_scores = ops.take_along_axis(scores, labels[..., None], axis=-1)
    return ops.squeeze(label_scores >= best, axis=-1)


@keras.saving.register_keras_serializable(package="keras_transformer")
class MaskedTokenAccuracy(keras.metrics.Metric):
    """Share of non-padding target tokens whose label gets the highest score.

    A token is right when its label's logit equals the row's maximum, a maximum that the loss
    computes too (`label_smoothed_token_losses`, the same op on the same tensor), so TensorFlow's
    graph optimizer computes it once. An arg-max over the `[batch, length, vocab]` logits was
    4-5% of the `mixed_bfloat16` training step of `small` on a 2-core CPU (in-process A/B,
    README Benchmarks). Ties differ from an arg-max: a label tied for the maximum counts as
    right, where an arg-max picks the lowest id; with logits from bfloat16 products that moved
    0.14% of 8,102 `val` tokens (70.51% against 70.38%), and none with float32 ones.
    """

    def __init__(self, pad_id=0, name="token_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = int(pad_id)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, "int32")
        mask = ops.cast(ops.not_equal(y_true, self.pad_id), "float32")
        hits = ops.cast(label_is_max(y_true, y_pred), "float32")
        self.correct.assign_add(ops.sum(hits * mask))
        self.total.assign_add(ops.sum(mask))

    def result(self):
        return self.correct / ops.maximum(self.total, 1.0)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}
