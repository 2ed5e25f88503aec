"""Adam whose update is one fused kernel per variable on TensorFlow."""

import keras


@keras.saving.register_keras_serializable(package="keras_transformer")
class Adam(keras.optimizers.Adam):
    """`keras.optimizers.Adam`, updated by TensorFlow's `ResourceApplyAdam` on that backend.

    The same update (Kingma & Ba with the bias corrections folded into the step size, as
    Keras writes it): `m += (g - m)(1 - beta_1)`, `v += (g^2 - v)(1 - beta_2)`,
    `w -= lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)`. Keras runs it
    as about a dozen elementwise ops per variable, each a pass over the variable's memory;
    `ResourceApplyAdam` is one multithreaded pass that reads `w, m, v, g` and writes
    `w, m, v`. Other backends (JAX) and `amsgrad` use Keras' update. Variables, their
    names and checkpoints are Keras Adam's.

    `rate_multiplier=True` adds a non-trainable variable `rate_multiplier` (1.0) that
    multiplies the learning rate (its schedule's value). Callbacks set it between steps, as
    training's `Cooldown` does from the wall clock, which a schedule of the step cannot see.
    Off by default: it adds an optimizer variable, and saved optimizer state loads only into
    the same variables.
    """

    def __init__(self, *args, rate_multiplier=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate_multiplier = None
        if rate_multiplier:
            # A tracked optimizer variable, so the JAX trainer carries it in its state like
            # `iterations` (a free variable would be traced in as a constant).
            self.rate_multiplier = self.add_variable(
                (), initializer="ones", dtype="float32", name="rate_multiplier"
            )

    def _get_current_learning_rate(self):
        rate = super()._get_current_learning_rate()
        if self.rate_multiplier is None:
            return rate
        return rate * self.rate_multiplier

    def get_config(self):
        return {**super().get_config(), "rate_multiplier": self.rate_multiplier is not None}

    def update_step(self, gradient, variable, learning_rate):
        if keras.config.backend() != "tensorflow" or self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        index = self._get_variable_index(variable)
        m = self._momentums[index].value
        v = self._velocities[index].value
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        # A sparse (embedding) gradient updates m and v everywhere in Keras' Adam too.
        gradient = tf.convert_to_tensor(tf.cast(gradient, dtype))
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=m.handle,
            v=v.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=gradient,
        )
