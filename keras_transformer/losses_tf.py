"""The TensorFlow half of `keras_transformer.losses`: the loss and its gradient as two kernels.

On `[batch, length, vocab]` logits TensorFlow's ops make about eight passes (a float32 copy of
bf16 logits, the maximum, the shift, the exponentials, their sum, the gradient's product, the
label scatter, the cast back), each over a tensor of 12M elements in the `small` training step.
`kernels/smoothed_cross_entropy.cc` does the forward pass in one read of each row and the
gradient in one read and one write: loss and gradient of bf16 `[64, 24, 8000]` logits took
5.4 ms against 15.8 ms on a 2-core CPU (micro-benchmark, README Benchmarks). The gradient of a
token whose upstream gradient is 0 (padding) is written as zeros without computing anything.

Each function returns None where the kernels are unavailable (`kernels.native.library()`), on
a machine with a GPU (the kernels are CPU-only; the ops path runs where the logits are), or for
logits of another dtype than float32 and bfloat16; callers then use `keras.ops`.
"""

from __future__ import annotations

from keras_transformer.kernels import native


def _uncast(logits):
    """The bfloat16 logits that `logits` is a float32 copy of, where it is one; else `logits`.

    `keras.losses.Loss.__call__` converts `y_pred` to the loss's float32 before `call`: under
    `mixed_bfloat16` a copy of the logits twice their size, which the kernel would read instead
    of the bf16 logits, and whose gradient is one more cast of a logits-sized tensor. The
    kernels compute in float32 from either (bfloat16 to float32 is exact), so they take the
    bf16 tensor and the gradient flows to it directly (the `small` bf16 step: 1.012x).
    """
    import tensorflow as tf

    op = getattr(logits, "op", None)  # graph tensors only; eager tensors have no producer
    if op is not None and op.type == "Cast" and op.inputs[0].dtype == tf.bfloat16:
        return op.inputs[0]
    return logits


def _rows(logits):
    import tensorflow as tf

    return tf.reshape(logits, [-1, tf.shape(logits)[-1]])


def _label_logits(labels, logits):
    """float32, labels' shape: each token's label logit (a gather of one value per token;
    TensorFlow refuses a label outside the vocabulary, naming it)."""
    import tensorflow as tf

    rows = _rows(logits)
    picked = tf.gather(rows, tf.reshape(labels, [-1, 1]), batch_dims=1)
    return tf.reshape(tf.cast(picked, tf.float32), tf.shape(labels))


def _statistics(kernels, logits):
    """`(log_normalizer, max_logit, mean_logit)`, float32, logits' shape without the last axis.

    Both the loss and the accuracy ask for this with the same op on the same tensor, so
    TensorFlow's graph optimizer computes it once."""
    import tensorflow as tf

    outputs = kernels.keras_transformer_logit_statistics(_rows(logits))
    return [tf.reshape(out, tf.shape(logits)[:-1]) for out in outputs]


def token_losses(labels, logits, label_smoothing):
    """`losses.label_smoothed_token_losses` by the kernels, or None (see the module)."""
    import tensorflow as tf

    kernels = native.kernels_for(logits)
    if kernels is None:
        return None
    logits = _uncast(logits)
    labels = tf.cast(labels, tf.int32)
    smoothing = float(label_smoothing)

    @tf.custom_gradient
    def losses(logits):
        log_normalizer, _, mean_logit = _statistics(kernels, logits)
        value = log_normalizer - (1.0 - smoothing) * _label_logits(labels, logits)
        if smoothing:
            value -= smoothing * mean_logit

        def grad(upstream):
            gradient = kernels.keras_transformer_smoothed_cross_entropy_grad(
                _rows(logits),
                tf.reshape(labels, [-1]),
                tf.reshape(log_normalizer, [-1]),
                tf.reshape(tf.cast(upstream, tf.float32), [-1]),
                smoothing=smoothing,
            )
            return tf.reshape(gradient, tf.shape(logits))

        return value, grad

    return losses(logits)


def label_is_max(labels, logits):
    """Bool, labels' shape: whether each label's logit is its row's maximum; or None."""
    import tensorflow as tf

    kernels = native.kernels_for(logits)
    if kernels is None:
        return None
    logits = _uncast(logits)
    labels = tf.cast(labels, tf.int32)
    return _label_logits(labels, logits) >= _statistics(kernels, logits)[1]
