"""The functional model: size, causality, padding, norm placement, saving, training."""

import keras
import numpy as np
import pytest

from keras_transformer import (
    MaskedLabelSmoothingLoss,
    MaskedTokenAccuracy,
    TransformerConfig,
    build_transformer,
    transformer_optimizer,
)
from tests.core.copy_task import copy_task_batch


def expected_parameter_count(config: TransformerConfig) -> int:
    """The paper's architecture counted by hand: shared embedding, no output bias."""
    d, f = config.d_model, config.ffn_dim
    attention = 4 * (d * d + d)
    feed_forward = d * f + f + f * d + d
    layer_norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * layer_norm
    decoder_layer = 2 * attention + feed_forward + 3 * layer_norm
    return (
        config.vocab_size * d
        + config.num_encoder_layers * encoder_layer
        + config.num_decoder_layers * decoder_layer
    )


@pytest.mark.parametrize("vocab_size, millions", [(32000, 60.5), (37000, 63.1)])
def test_base_has_the_paper_size(vocab_size, millions):
    config = TransformerConfig.preset("base", vocab_size=vocab_size)
    model = build_transformer(config)
    assert model.count_params() == expected_parameter_count(config)
    assert round(model.count_params() / 1e6, 1) == millions


def test_unshared_embeddings_add_two_matrices():
    config = TransformerConfig.preset("tiny", share_embeddings=False, target_vocab_size=80)
    model = build_transformer(config)
    shared = expected_parameter_count(config)
    assert model.count_params() == shared + 80 * config.d_model * 2
    assert model(_random_batch(config, 2, 5, 4)).shape == (2, 4, 80)


def _random_batch(config, batch, source_length, target_length, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.integers(4, config.vocab_size, (batch, source_length)).astype("int32")
    target = rng.integers(4, config.vocab_size, (batch, target_length)).astype("int32")
    return {"source_ids": source, "target_ids": target}


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_changing_target_token_t_changes_no_earlier_logit(norm_placement):
    config = TransformerConfig.preset("tiny", norm_placement=norm_placement)
    model = build_transformer(config)
    inputs = _random_batch(config, 2, 6, 7)
    before = keras.ops.convert_to_numpy(model(inputs))
    for t in (1, 4, 6):
        changed = {k: v.copy() for k, v in inputs.items()}
        changed["target_ids"][:, t] = (changed["target_ids"][:, t] + 3) % (
            config.vocab_size - 4
        ) + 4
        after = keras.ops.convert_to_numpy(model(changed))
        np.testing.assert_allclose(after[:, :t], before[:, :t], atol=1e-5)
        assert np.abs(after[:, t:] - before[:, t:]).max() > 1e-4


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_extra_source_padding_changes_no_logit(norm_placement):
    config = TransformerConfig.preset("tiny", norm_placement=norm_placement)
    model = build_transformer(config)
    inputs = _random_batch(config, 3, 5, 6)
    inputs["source_ids"][1, 3:] = 0  # one sentence already shorter than the batch
    padded = dict(inputs, source_ids=np.pad(inputs["source_ids"], ((0, 0), (0, 9))))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(padded)),
        keras.ops.convert_to_numpy(model(inputs)),
        atol=1e-5,
    )
    # Padding a sentence must equal running it alone.
    alone = {k: v[1:2, :3] if k == "source_ids" else v[1:2] for k, v in inputs.items()}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(alone))[0],
        keras.ops.convert_to_numpy(model(inputs))[1],
        atol=1e-5,
    )


def _compile(model, config, warmup=200, scale=1.0):
    model.compile(
        optimizer=transformer_optimizer(config.d_model, warmup_steps=warmup, scale=scale),
        loss=MaskedLabelSmoothingLoss(config.label_smoothing, pad_id=config.pad_id),
        metrics=[MaskedTokenAccuracy(pad_id=config.pad_id)],
    )


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_both_norm_placements_train(norm_placement):
    keras.utils.set_random_seed(3)
    config = TransformerConfig.preset("tiny", norm_placement=norm_placement, label_smoothing=0.0)
    model = build_transformer(config)
    _compile(model, config)
    x, y = copy_task_batch(config, 512, seed=0)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.75 * history["loss"][0]
    assert np.isfinite(history["loss"]).all()


def test_overfits_the_copy_task_with_fit():
    keras.utils.set_random_seed(1)
    config = TransformerConfig.preset("tiny", label_smoothing=0.0)
    model = build_transformer(config)
    _compile(model, config)
    x, y = copy_task_batch(config, 2048, seed=0)
    # 14 epochs: at 10 the result sat near the bar (0.92-0.97 between runs whose losses differ
    # only by float rounding, which Adam turns into different steps for zero-gradient biases).
    model.fit(x, y, batch_size=32, epochs=14, verbose=0)
    x_test, y_test = copy_task_batch(config, 256, seed=1)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.97, accuracy


def _numpy(variables):
    return {v.path: keras.ops.convert_to_numpy(v) for v in variables}


def test_keras_file_round_trip_restores_optimizer_state_and_next_step(tmp_path):
    """The `.keras` file holds weights, config, Adam's moments and the schedule: after loading,
    one more `train_on_batch` gives the same loss and the same weights as in the original."""
    keras.utils.set_random_seed(5)
    config = TransformerConfig.preset("tiny", norm_placement="pre", dropout=0.0)
    model = build_transformer(config)
    # A scale and warm-up other than the defaults, so a schedule that does not round-trip
    # changes the next step's learning rate.
    _compile(model, config, warmup=37, scale=3.0)
    x, y = copy_task_batch(config, 64)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.config == config
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(model(x))
    )
    # Adam's first and second moments of every weight, and the iteration counter.
    saved_state, restored_state = (
        _numpy(model.optimizer.variables),
        _numpy(restored.optimizer.variables),
    )
    assert restored_state.keys() == saved_state.keys()
    assert sum("momentum" in p or "velocity" in p for p in saved_state) == 2 * len(
        model.trainable_variables
    )
    for path_in_model, value in saved_state.items():
        np.testing.assert_array_equal(restored_state[path_in_model], value, err_msg=path_in_model)
    assert float(restored.optimizer.learning_rate) == float(model.optimizer.learning_rate)

    batch = copy_task_batch(config, 32, seed=7)
    next_loss = model.train_on_batch(*batch)
    assert restored.train_on_batch(*batch) == next_loss
    after, restored_after = _numpy(model.weights), _numpy(restored.weights)
    assert restored_after.keys() == after.keys()
    for path_in_model, value in after.items():
        np.testing.assert_array_equal(restored_after[path_in_model], value, err_msg=path_in_model)


def test_dropout_is_active_only_in_training():
    config = TransformerConfig.preset("tiny", dropout=0.3)
    model = build_transformer(config)
    inputs = _random_batch(config, 2, 5, 5)
    inference = [keras.ops.convert_to_numpy(model(inputs)) for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    training = keras.ops.convert_to_numpy(model(inputs, training=True))
    assert np.abs(training - inference[0]).max() > 1e-3
