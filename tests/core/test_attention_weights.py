"""Attention weights: the ones returned are the ones used; the projections are real layers."""

from pathlib import Path

import keras
import numpy as np
import pytest

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.layers import MultiHeadAttention

FIXTURES = Path(__file__).resolve().parent / "fixtures"
rng = np.random.default_rng(0)
X = rng.normal(size=(2, 5, 16)).astype("float32")
MEMORY = rng.normal(size=(2, 7, 16)).astype("float32")
KEY_MASK = np.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], bool)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_returned_weights_are_the_ones_used():
    """Recomputes the output from the returned weights and the value projection. Catches
    weights returned before masking or without softmax, or a different layout."""
    layer = MultiHeadAttention(num_heads=4, key_dim=4)
    output, weights = layer(X, MEMORY, attention_mask=KEY_MASK, return_attention_scores=True)
    output, weights = numpy(output), numpy(weights)
    assert weights.shape == (2, 4, 5, 7)
    values = numpy(layer.value_dense(MEMORY))  # [batch, key, heads, head_dim]
    context = np.einsum("bhqk,bkhd->bqhd", weights, values)
    recomputed = numpy(layer.output_dense(context))
    np.testing.assert_allclose(output, recomputed, atol=1e-5)
    np.testing.assert_allclose(numpy(layer(X, MEMORY, attention_mask=KEY_MASK)), output, atol=1e-6)


def test_weights_are_probabilities_over_allowed_keys_only():
    layer = MultiHeadAttention(num_heads=2, key_dim=8)
    _, weights = layer(X, MEMORY, attention_mask=KEY_MASK, return_attention_scores=True)
    weights = numpy(weights)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
    assert not weights[0, :, :, 4:].any()
    assert (weights[0, :, :, :4] > 0).all()
    _, causal = layer(X, use_causal_mask=True, return_attention_scores=True)
    causal = numpy(causal)
    assert not causal[:, :, np.triu(np.ones((5, 5), bool), k=1)].any()
    np.testing.assert_allclose(causal.sum(axis=-1), 1.0, atol=1e-5)


def test_model_returns_every_layers_attention_weights():
    config = TransformerConfig.preset("tiny", num_encoder_layers=2, num_decoder_layers=3)
    model = build_transformer(config)
    source = np.array([[7, 8, 9, 10, 3], [11, 12, 3, 0, 0]], "int32")
    target = np.array([[2, 20, 21, 22, 23, 24], [2, 30, 31, 0, 0, 0]], "int32")
    weights = {
        name: [numpy(w) for w in values]
        for name, values in model.attention_weights(source, target).items()
    }
    heads = config.num_heads
    assert [w.shape for w in weights["encoder_self_attention"]] == [(2, heads, 5, 5)] * 2
    assert [w.shape for w in weights["decoder_self_attention"]] == [(2, heads, 6, 6)] * 3
    assert [w.shape for w in weights["cross_attention"]] == [(2, heads, 6, 5)] * 3
    above_diagonal = np.triu(np.ones((6, 6), bool), k=1)
    for w in weights["decoder_self_attention"]:
        assert not w[:, :, above_diagonal].any()
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)
    for w in weights["encoder_self_attention"] + weights["cross_attention"]:
        assert not w[1, :, :, 3:].any()  # the second source's padding
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)
    # The same layers as the model's forward pass: layer 0's encoder weights by hand.
    layer = model.encoder_layers[0]
    embedded = model.source_embedding(source)
    _, by_hand = layer.self_attention(
        embedded, attention_mask=source != 0, return_attention_scores=True
    )
    np.testing.assert_allclose(weights["encoder_self_attention"][0], numpy(by_hand), atol=1e-6)


def test_projections_follow_the_dtype_policy():
    """Variables float32, products in bfloat16 under mixed_bfloat16: the projections run as
    layers. The output matches the float32 layer with the same weights."""
    layer = MultiHeadAttention(num_heads=2, key_dim=8, dtype="mixed_bfloat16")
    reference = MultiHeadAttention(num_heads=2, key_dim=8)
    output = layer(X, MEMORY)
    reference(X, MEMORY)
    reference.set_weights(layer.get_weights())
    assert all(w.dtype == "float32" for w in layer.weights)
    assert layer.query_dense.compute_dtype == "bfloat16"
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    projected = layer.query_dense(X)
    assert keras.backend.standardize_dtype(projected.dtype) == "bfloat16"
    np.testing.assert_allclose(
        numpy(keras.ops.cast(output, "float32")), numpy(reference(X, MEMORY)), atol=0.05
    )


def test_lora_and_quantization_of_the_projections_take_effect():
    """A projection read as a raw kernel (bypassing the layer) would ignore both: LoRA's
    update would not change the output, and an int8 kernel would be read as numbers."""
    layer = MultiHeadAttention(num_heads=2, key_dim=8)
    before = numpy(layer(X, MEMORY))
    layer.query_dense.enable_lora(2)
    layer.query_dense.lora_kernel_b.assign(np.full(layer.query_dense.lora_kernel_b.shape, 0.5))
    with_lora = numpy(layer(X, MEMORY))
    assert np.abs(with_lora - before).max() > 1e-2
    einsum = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 8), bias_axes="de")
    einsum.build(X.shape)
    einsum.kernel.assign(layer.query_dense.kernel)  # the LoRA-merged kernel
    einsum.bias.assign(layer.query_dense.bias)
    np.testing.assert_allclose(numpy(layer.query_dense(X)), numpy(einsum(X)), atol=1e-5)

    quantized = MultiHeadAttention(num_heads=2, key_dim=8)
    reference = numpy(quantized(X, MEMORY))
    for projection in ("query_dense", "key_dense", "value_dense", "output_dense"):
        getattr(quantized, projection).quantize("int8")
    assert quantized.query_dense.quantization_mode == "int8"
    np.testing.assert_allclose(numpy(quantized(X, MEMORY)), reference, atol=0.05)


def test_checkpoint_written_before_the_refactoring_loads_with_identical_outputs():
    """`fixtures/head_f39de68_tiny.weights.h5` was saved by the code at f39de68 (EinsumDense
    projections read by tensordot, two copies of the stacks) with
    `fixtures/make_head_f39de68_fixture.py`; its logits are in the `.npz`. Catches renamed or
    reordered layers/weights, which change the checkpoint's paths."""
    config = TransformerConfig.from_json(FIXTURES / "head_f39de68_tiny_config.json")
    model = build_transformer(config)
    model.load_weights(FIXTURES / "head_f39de68_tiny.weights.h5")
    expected = np.load(FIXTURES / "head_f39de68_tiny_logits.npz")
    inputs = {"source_ids": expected["source"], "target_ids": expected["target"]}
    np.testing.assert_allclose(numpy(model(inputs)), expected["logits"], atol=1e-6)
    memory, mask = model.encode(expected["source"])
    decoded = numpy(model.decode(expected["target"], memory, mask))
    np.testing.assert_allclose(decoded, expected["logits"], atol=1e-5)


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_functional_graph_and_decode_are_one_computation(norm_placement):
    """Model call and `encode` + `decode` run the same stack code; dropout off both ways."""
    model = build_transformer(TransformerConfig.preset("tiny", norm_placement=norm_placement))
    source = np.array([[7, 8, 9, 3], [11, 3, 0, 0]], "int32")
    target = np.array([[2, 20, 21], [2, 30, 0]], "int32")
    memory, mask = model.encode(source)
    np.testing.assert_allclose(
        numpy(model.decode(target, memory, mask)),
        numpy(model({"source_ids": source, "target_ids": target})),
        atol=1e-6,
    )
