"""The TensorFlow half of `keras_transformer.layers.layer_norm.LayerNorm`: its gradient.

With `y = xhat * gamma + beta`, `xhat = (x - mean) * rstd` over the last axis, the gradient is
`dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * gamma`, and
`dgamma = sum(dy * xhat)`, `dbeta = sum(dy)` over the other axes: about 15 ops, where
TensorFlow's automatic differentiation of the forward ops (`tf.nn.moments`' reductions and
broadcasts, `Tile`s included) emits about 60. Where this package's compiled kernels are available
(`keras_transformer.kernels.native`), the forward pass and the gradient are one kernel each
(`kernels/layer_norm.cc`, one pass over the rows, the output rounded once to the input's dtype).
"""

from __future__ import annotations


def layer_norm(inputs, gamma, beta, epsilon):
    """Layer norm of `inputs` over its last axis, computed in (at least) float32 like Keras'
    `ops.layer_normalization`, returned in float32 or, by the kernels, in the dtype of
    `inputs` (the caller casts it to its compute dtype).

    Args:
        inputs: float `[..., features]`.
        gamma, beta: float32 `[features]` variables (read here, so the tape sees them).
        epsilon: added to the variance.
    """
    import tensorflow as tf

    kernels = _kernels(inputs, gamma)
    if kernels is not None:
        return _kernel_layer_norm(kernels, inputs, gamma, beta, epsilon)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        x32 = tf.cast(x, tf.float32) if x.dtype != tf.float64 else x
        mean = tf.reduce_mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        rstd = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True) + epsilon)
        xhat = centered * rstd
        outputs = xhat * tf.cast(gamma, x32.dtype) + tf.cast(beta, x32.dtype)

        def grad(upstream):
            dy = tf.cast(upstream, x32.dtype)
            features = tf.shape(dy)[-1]
            rows_dy = tf.reshape(dy, [-1, features])
            dgamma = tf.reduce_sum(rows_dy * tf.reshape(xhat, [-1, features]), axis=0)
            dbeta = tf.reduce_sum(rows_dy, axis=0)
            g = dy * tf.cast(gamma, x32.dtype)
            dx = rstd * (
                g
                - tf.reduce_mean(g, axis=-1, keepdims=True)
                - xhat * tf.reduce_mean(g * xhat, axis=-1, keepdims=True)
            )
            return tf.cast(dx, x.dtype), tf.cast(dgamma, gamma.dtype), tf.cast(dbeta, beta.dtype)

        return outputs, grad

    # Tensors, not variables, go into the custom gradient (it would otherwise ask for the
    # gradients of the variables it reads); reading them here keeps them on the tape.
    return normalize(inputs, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


def _kernels(inputs, gamma):
    from keras_transformer.kernels import native

    if gamma.dtype != "float32":
        return None
    return native.kernels_for(inputs)


def _kernel_layer_norm(kernels, inputs, gamma, beta, epsilon):
    import tensorflow as tf

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        rows = tf.reshape(x, [-1, tf.shape(x)[-1]])
        y, mean, rstd = kernels.keras_transformer_layer_norm(rows, gamma, beta, epsilon=epsilon)

        def grad(upstream):
            dx, dgamma, dbeta = kernels.keras_transformer_layer_norm_grad(
                tf.reshape(tf.cast(upstream, x.dtype), tf.shape(rows)), rows, gamma, mean, rstd
            )
            return tf.reshape(dx, tf.shape(x)), dgamma, dbeta

        return tf.reshape(y, tf.shape(x)), grad

    return normalize(inputs, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))
