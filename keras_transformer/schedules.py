"""The learning-rate schedule of §5.3 and the paper's Adam settings."""

import keras
from keras import ops

from keras_transformer.optimizers import Adam


@keras.saving.register_keras_serializable(package="keras_transformer")
class TransformerSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)` (§5.3).

    Linear warm-up for `warmup_steps`, then decay with the inverse square root of the step.
    `step` counts from 1 (the optimizer's iteration 0 is step 1), so the first rate is not 0.

    Args:
        d_model: model width.
        warmup_steps: 4000 in the paper.
        scale: multiplies the whole curve (1.0 in the paper; small-data runs often use 2.0).
        gradient_accumulation_steps: micro-batches per optimizer update. A Keras optimizer
            with `gradient_accumulation_steps` calls its schedule with its micro-batch counter;
            dividing by this makes `step` (warm-up and decay) count updates, as without
            accumulation.
    """

    def __init__(self, d_model, warmup_steps=4000, scale=1.0, gradient_accumulation_steps=1):
        if int(gradient_accumulation_steps) < 1:
            raise ValueError(
                "gradient_accumulation_steps must be at least 1, got "
                f"{gradient_accumulation_steps!r}"
            )
        self.d_model = int(d_model)
        self.warmup_steps = int(warmup_steps)
        self.scale = float(scale)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)

    def __call__(self, step):
        # The k micro-batches of update j see iterations j*k .. j*k+k-1; the update itself is
        # applied on the last of them, so floor division gives update j its own rate.
        updates = ops.floor_divide(step, self.gradient_accumulation_steps)
        step = ops.cast(updates, "float32") + 1.0
        warmup = float(self.warmup_steps) ** -1.5
        return (
            self.scale * float(self.d_model) ** -0.5 * ops.minimum(ops.rsqrt(step), step * warmup)
        )

    def get_config(self):
        return {
            "d_model": self.d_model,
            "warmup_steps": self.warmup_steps,
            "scale": self.scale,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }


def transformer_optimizer(d_model, warmup_steps=4000, scale=1.0, **kwargs):
    """Adam with beta1=0.9, beta2=0.98, epsilon=1e-9 on the §5.3 schedule (our `Adam`: one
    fused update per variable on TensorFlow).

    `gradient_accumulation_steps` (in `kwargs`, Keras' optimizer argument) also goes to the
    schedule, so warm-up counts optimizer updates, not micro-batches.
    """
    return Adam(
        learning_rate=TransformerSchedule(
            d_model,
            warmup_steps,
            scale,
            gradient_accumulation_steps=kwargs.get("gradient_accumulation_steps") or 1,
        ),
        beta_1=0.9,
        beta_2=0.98,
        epsilon=1e-9,
        **kwargs,
    )
