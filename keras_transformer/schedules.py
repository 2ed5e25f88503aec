"""The learning-rate schedule of §5.3 and the paper's Adam settings."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_transformer")
class TransformerSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)` (§5.3).

    Linear warm-up for `warmup_steps`, then decay with the inverse square root of the step.
    `step` counts from 1 (the optimizer's iteration 0 is step 1), so the first rate is not 0.

    Args:
        d_model: model width.
        warmup_steps: 4000 in the paper.
        scale: multiplies the whole curve (1.0 in the paper; small-data runs often use 2.0).
    """

    def __init__(self, d_model, warmup_steps=4000, scale=1.0):
        self.d_model = int(d_model)
        self.warmup_steps = int(warmup_steps)
        self.scale = float(scale)

    def __call__(self, step):
        step = ops.cast(step, "float32") + 1.0
        warmup = float(self.warmup_steps) ** -1.5
        return (
            self.scale * float(self.d_model) ** -0.5 * ops.minimum(ops.rsqrt(step), step * warmup)
        )

    def get_config(self):
        return {"d_model": self.d_model, "warmup_steps": self.warmup_steps, "scale": self.scale}


def transformer_optimizer(d_model, warmup_steps=4000, scale=1.0, **kwargs):
    """Adam with beta1=0.9, beta2=0.98, epsilon=1e-9 on the §5.3 schedule."""
    return keras.optimizers.Adam(
        learning_rate=TransformerSchedule(d_model, warmup_steps, scale),
        beta_1=0.9,
        beta_2=0.98,
        epsilon=1e-9,
        **kwargs,
    )
