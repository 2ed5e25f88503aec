"""Position-wise feed-forward network (§3.3)."""

import keras
from keras import ops

from keras_transformer.layers.dropout import Dropout


@keras.saving.register_keras_serializable(package="keras_transformer")
class PositionwiseFeedForward(keras.layers.Layer):
    """`FFN(x) = max(0, x W1 + b1) W2 + b2`, applied to every position alike.

    Args:
        hidden_dim: inner size `d_ff`.
        dropout: dropout on the inner activation (as in tensor2tensor's `relu_dropout`).
        activation: inner activation, `"relu"` in the paper.
        kernel_initializer: initializer of both kernels.

    Call arguments:
        inputs: `[batch, length, model_dim]`.
        training: enables dropout.

    Returns:
        `[batch, length, model_dim]`.
    """

    def __init__(
        self,
        hidden_dim,
        dropout=0.0,
        activation="relu",
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.dropout = float(dropout)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, inputs_shape):
        model_dim = inputs_shape[-1]
        # The activation is applied in `call` (see there), not by the layer.
        self.inner_dense = keras.layers.Dense(
            self.hidden_dim,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype=self.dtype_policy,
            name="inner",
        )
        self.output_dense = keras.layers.Dense(
            model_dim,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype=self.dtype_policy,
            name="output",
        )
        self.dropout_layer = Dropout(self.dropout, name="inner_dropout")
        self.inner_dense.build(inputs_shape)
        self.output_dense.build((*inputs_shape[:-1], self.hidden_dim))
        self.built = True

    def call(self, inputs, training=None):
        hidden = self.inner_dense(inputs)
        if training and self.dropout > 0 and self.activation is keras.activations.relu:
            # The ReLU folded into the dropout mask, `relu(x) * mask == x * (mask and x > 0)`:
            # no ReLU pass and no ReLU gradient pass. On TensorFlow the bf16 training step ran
            # 1.012-1.018x (`small`) and 1.006-1.02x (`base`) in in-process A/Bs (README).
            # (A pre-activation of -inf gives NaN here where the ReLU gave 0.)
            hidden = self.dropout_layer(hidden, training=True, keep=ops.greater(hidden, 0))
        else:
            hidden = self.dropout_layer(self.activation(hidden), training=training)
        return self.output_dense(hidden)

    def step_weights(self):
        """Both layers' `(kernel, bias)`, read once per decoding search (see
        `MultiHeadAttention.step_weights`); `None` under LoRA or quantization."""
        layers = (self.inner_dense, self.output_dense)
        if any(layer.lora_enabled or layer.quantization_mode is not None for layer in layers):
            return None
        return [
            (ops.convert_to_tensor(layer.kernel), ops.convert_to_tensor(layer.bias))
            for layer in layers
        ]

    def call_rows(self, inputs, step_weights):
        """Inference on `[rows, model_dim]` with `step_weights()`: two 2-D products."""
        (inner, inner_bias), (outer, outer_bias) = step_weights
        hidden = ops.matmul(inputs, ops.cast(inner, inputs.dtype)) + ops.cast(
            inner_bias, inputs.dtype
        )
        hidden = self.activation(hidden)
        return ops.matmul(hidden, ops.cast(outer, inputs.dtype)) + ops.cast(
            outer_bias, inputs.dtype
        )

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            dropout=self.dropout,
            activation=keras.activations.serialize(self.activation),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
