"""Our Adam (one fused update per variable on TensorFlow) against Adam's formula and Keras'."""

import keras
import numpy as np
import pytest

from keras_transformer import TransformerSchedule, transformer_optimizer
from keras_transformer.optimizers import Adam

BETA_1, BETA_2, EPSILON = 0.9, 0.98, 1e-9


def _formula(weights, gradients, rates):
    """Adam as the paper of Kingma & Ba writes it, with Keras' placement of epsilon."""
    weights = [w.copy() for w in weights]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    for t, (step_gradients, rate) in enumerate(zip(gradients, rates, strict=True), start=1):
        for i, g in enumerate(step_gradients):
            m[i] = BETA_1 * m[i] + (1 - BETA_1) * g
            v[i] = BETA_2 * v[i] + (1 - BETA_2) * g * g
            alpha = rate * np.sqrt(1 - BETA_2**t) / (1 - BETA_1**t)
            weights[i] -= alpha * m[i] / (np.sqrt(v[i]) + EPSILON)
    return weights, m, v


def _compiled_apply(optimizer, variables, rows):
    """A `tf.function` step applying a dense gradient and an embedding-style sparse one."""
    import tensorflow as tf

    @tf.function
    def step(dense_gradient, sparse_values):
        table = tf.IndexedSlices(sparse_values, rows, dense_shape=variables[1].shape)
        optimizer.apply([dense_gradient, table], variables)

    return step


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="the fused kernel is TF's")
def test_adam_follows_the_formula_with_dense_and_sparse_gradients_and_a_schedule():
    """Catches beta powers taken at the iteration count instead of count + 1 (the first step
    divides by zero), m and v swapped, epsilon or the bias corrections dropped, a schedule read
    once instead of per step, and repeated rows of a sparse (embedding) gradient not summed."""
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(7, 3)).astype("float32")]
    rows = np.array([1, 4, 1], "int32")  # row 1 twice: its gradients add up
    dense = [rng.normal(size=(5, 3)).astype("float32") for _ in range(4)]
    sparse = [rng.normal(size=(3, 3)).astype("float32") for _ in range(4)]
    schedule = TransformerSchedule(d_model=16, warmup_steps=2, scale=0.5)

    results = {}
    for name, optimizer_class in (("ours", Adam), ("keras", keras.optimizers.Adam)):
        variables = [keras.Variable(w) for w in initial]
        optimizer = optimizer_class(schedule, beta_1=BETA_1, beta_2=BETA_2, epsilon=EPSILON)
        optimizer.build(variables)

        step = _compiled_apply(optimizer, variables, rows)
        for d, s in zip(dense, sparse, strict=True):
            step(d, s)
        results[name] = [v.numpy() for v in variables] + [
            v.numpy() for v in optimizer._momentums + optimizer._velocities
        ]

    table_gradients = []
    for s in sparse:
        table = np.zeros((7, 3), "float32")
        np.add.at(table, rows, s)
        table_gradients.append(table)
    rates = [float(schedule(step)) for step in range(4)]
    weights, m, v = _formula(initial, list(zip(dense, table_gradients, strict=True)), rates)
    for got, want in zip(results["ours"], weights + m + v, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # Keras' Adam agrees on dense gradients (the dense weight, its m and its v). On a sparse
    # one with a repeated row it squares each piece before adding them (g1^2 + g2^2 where
    # Adam's v takes (g1 + g2)^2); ours densifies first, as the formula says.
    for i in (0, 2, 4):
        np.testing.assert_allclose(results["ours"][i], results["keras"][i], rtol=2e-6, atol=1e-7)


def test_transformer_optimizer_is_our_adam_and_round_trips_with_keras_adams_variables():
    """Catches the recipe's optimizer falling back to Keras' Adam (losing the fused update),
    settings lost in serialization (a resumed or reloaded run would change beta_2/epsilon),
    and state variables named differently from Keras Adam's (old checkpoints would not load)."""
    optimizer = transformer_optimizer(64, warmup_steps=10)
    assert type(optimizer) is Adam
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.9, 0.98, 1e-9)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is Adam
    assert restored.get_config() == optimizer.get_config()

    variables = [keras.Variable(np.zeros((2, 3), "float32"), name="kernel")]
    ours, theirs = Adam(name="adam"), keras.optimizers.Adam(name="adam")
    ours.build(variables)
    theirs.build(variables)
    assert [v.path for v in ours.variables] == [v.path for v in theirs.variables]
