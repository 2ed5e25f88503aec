"""Each layer: output shape, config round trip through keras.saving, masks, and the decode cache."""

import importlib.util

import keras
import numpy as np
import pytest

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.layers import (
    MultiHeadAttention,
    PositionwiseFeedForward,
    TokenAndPositionEmbedding,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    sinusoidal_position_encoding,
)
from tests.subprocess_report import run_script

rng = np.random.default_rng(0)
X = rng.normal(size=(2, 5, 16)).astype("float32")
MEMORY = rng.normal(size=(2, 7, 16)).astype("float32")
IDS = np.array([[5, 9, 3, 0, 0], [4, 4, 8, 11, 3]], "int32")

LAYERS = [
    (lambda: TokenAndPositionEmbedding(20, 16, max_length=32, dropout=0.1), (IDS,), (2, 5, 16)),
    (lambda: MultiHeadAttention(num_heads=4, key_dim=4, dropout=0.1), (X, MEMORY), (2, 5, 16)),
    (lambda: PositionwiseFeedForward(32, dropout=0.1), (X,), (2, 5, 16)),
    (lambda: TransformerEncoderLayer(4, 32, dropout=0.1, norm_placement="pre"), (X,), (2, 5, 16)),
    (lambda: TransformerDecoderLayer(4, 32, dropout=0.1), (X, MEMORY), (2, 5, 16)),
]


@pytest.mark.parametrize("make_layer, inputs, shape", LAYERS)
def test_shape_and_serialization_round_trip(make_layer, inputs, shape):
    layer = make_layer()
    outputs = keras.ops.convert_to_numpy(layer(*inputs))
    assert outputs.shape == shape
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert restored.get_config() == layer.get_config()
    restored(*inputs)
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored(*inputs)), outputs, atol=1e-6)
    assert len(restored.trainable_weights) == len(layer.trainable_weights)


def test_positional_encoding_is_the_papers_sinusoid():
    table = sinusoidal_position_encoding(50, 8)
    position, i = 7, 2
    assert table[position, 2 * i] == pytest.approx(np.sin(position / 10000 ** (2 * i / 8)))
    assert table[position, 2 * i + 1] == pytest.approx(np.cos(position / 10000 ** (2 * i / 8)))


def test_embedding_is_scaled_and_reversible():
    layer = TokenAndPositionEmbedding(20, 16, max_length=32)
    out = keras.ops.convert_to_numpy(layer(IDS))
    table = keras.ops.convert_to_numpy(layer.embeddings)
    expected = table[IDS] * 4.0 + sinusoidal_position_encoding(32, 16)[:5]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    shifted = keras.ops.convert_to_numpy(layer(IDS[:, 2:3], start_index=2))
    np.testing.assert_allclose(shifted, expected[:, 2:3], atol=1e-5)
    logits = keras.ops.convert_to_numpy(layer(X, reverse=True))
    np.testing.assert_allclose(logits, X @ table.T, atol=1e-4)


def test_attention_ignores_masked_keys():
    layer = MultiHeadAttention(num_heads=2, key_dim=8)
    mask = np.array([[1, 1, 1, 0, 0, 0, 0], [1] * 7], bool)
    full = keras.ops.convert_to_numpy(layer(X, MEMORY, attention_mask=mask))
    garbage = MEMORY.copy()
    garbage[0, 3:] = 1e3
    changed = keras.ops.convert_to_numpy(layer(X, garbage, attention_mask=mask))
    np.testing.assert_allclose(changed, full, atol=1e-5)


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_cached_decode_steps_equal_one_full_pass(norm_placement):
    config = TransformerConfig.preset("tiny", norm_placement=norm_placement)
    model = build_transformer(config)
    # Layer norms away from their initial identity, so a norm applied twice shows.
    rng = np.random.default_rng(0)
    for weight in model.weights:
        if "norm" in weight.path:
            weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
    source = np.array([[7, 8, 9, 10, 3], [11, 12, 3, 0, 0]], "int32")
    target = np.array([[2, 20, 21, 22, 23, 24], [2, 30, 31, 32, 0, 0]], "int32")
    full = keras.ops.convert_to_numpy(model({"source_ids": source, "target_ids": target}))
    memory, source_mask = model.encode(source)
    state = model.init_decoder_state(memory, source_mask, max_length=10)
    for index in range(target.shape[1]):
        logits, state = model.decode_step(target[:, index], index, state)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(logits), full[:, index], atol=2e-5)
    # The cache has a fixed shape: it was preallocated, not grown.
    assert tuple(state["key_caches"][0].shape) == (2, config.num_heads, 10, config.head_dim)


def test_beams_share_encoder_keys_and_values():
    """Rows [batch * beams] attend to [batch] cross keys/values without tiling them."""
    config = TransformerConfig.preset("tiny")
    model = build_transformer(config)
    source = np.array([[7, 8, 9, 3], [11, 12, 3, 0]], "int32")
    tokens = np.array([[2, 40, 41], [2, 42, 43], [2, 44, 45]], "int32")  # 3 beams
    memory, source_mask = model.encode(source)
    state = model.init_decoder_state(memory, source_mask, max_length=6, beams=3)
    assert tuple(state["cross_keys"][0].shape)[0] == 2
    for index in range(3):
        step_ids = np.concatenate([tokens[:, index], tokens[:, index]])
        logits, state = model.decode_step(step_ids, index, state, beams=3)
    logits = keras.ops.convert_to_numpy(logits).reshape(2, 3, -1)
    for sentence in range(2):
        full = model(
            {"source_ids": np.repeat(source[sentence : sentence + 1], 3, 0), "target_ids": tokens}
        )
        np.testing.assert_allclose(
            logits[sentence], keras.ops.convert_to_numpy(full)[:, -1], atol=2e-5
        )


def test_init_decoder_state_rejects_a_cache_longer_than_positions():
    model = build_transformer(TransformerConfig.preset("tiny"))
    memory, mask = model.encode(IDS)
    with pytest.raises(ValueError, match=r"max_length \(100\) exceeds"):
        model.init_decoder_state(memory, mask, max_length=100)


def test_tied_projection_gradient_builds_no_per_position_copy_of_the_table():
    """A broadcasting einsum (`"...d,vd->...v"`) gradient builds a [batch, length, vocab, d]
    tensor (67 GB for a `base` batch). Traces the gradient and checks every tensor's size."""
    tf = pytest.importorskip("tensorflow")
    if keras.config.backend() != "tensorflow":
        pytest.skip("inspects a TensorFlow graph")
    batch, length, vocab, dim = 4, 8, 500, 32
    layer = TokenAndPositionEmbedding(vocab, dim, max_length=8)
    layer.build()

    @tf.function
    def gradient(hidden):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(hidden, reverse=True))
        return tape.gradient(loss, layer.embeddings.value)

    graph = gradient.get_concrete_function(tf.TensorSpec([batch, length, dim])).graph
    sizes = [
        output.shape.num_elements()
        for op in graph.get_operations()
        for output in op.outputs
        if output.dtype.is_floating
    ]
    assert None not in sizes, "every float tensor of the gradient has a static shape"
    assert batch * length * vocab in sizes  # the logits, so the inspection sees the product
    assert max(sizes) < batch * length * vocab * dim
    assert tuple(gradient(tf.random.normal([batch, length, dim])).shape) == (vocab, dim)


DROPOUT_CHECK = r"""
import json, keras, numpy as np
from keras_transformer.layers.dropout import Dropout
layer = Dropout(0.1, seed=3)
x = keras.ops.ones((201, 501))  # 100,701 elements: three 8-bit numbers of the last word unused
first = np.asarray(layer(x, training=True))
second = np.asarray(layer(x, training=True))
again = np.asarray(Dropout(0.1, seed=3)(x, training=True))
bf16 = Dropout(0.1, seed=3, dtype="mixed_bfloat16")
half = bf16(keras.ops.ones((7, 3, 5), dtype="bfloat16"), training=True)
dropped = first == 0
keep_np = np.random.default_rng(0).random((201, 501)) < 0.5
x_keep = keras.ops.convert_to_tensor(keep_np)
kept = np.asarray(layer(x, training=True, keep=x_keep))
ones = np.ones((201, 501))
def rule(layer):
    out = np.asarray(layer(x, training=True))
    return {"drop_share": float((out == 0).mean()), "kept": sorted(set(out[out != 0].tolist())),
            "effective_rate": layer.effective_rate}
print(json.dumps({
    "backend": keras.config.backend(), "shape": list(first.shape),
    "drop_share": float((first == 0).mean()), "kept": sorted(set(first[first != 0].tolist())),
    "effective_rate": layer.effective_rate,
    "mean": float(first.mean()), "new_mask_share": float(((first == 0) != (second == 0)).mean()),
    "same_seed_same_mask": bool(np.array_equal(again, first)),
    # Elements d apart in a row: within one random word (d < 4), one JAX block (d < 8), or
    # across words.
    "both_dropped_at_offset": [
        float((dropped[:, :-d] & dropped[:, d:]).mean()) for d in range(1, 10)],
    "inference_unchanged": bool(np.array_equal(np.asarray(layer(x, training=False)), ones)),
    "rate_0_unchanged": bool(np.array_equal(np.asarray(Dropout(0.0)(x, training=True)), ones)),
    "bf16": [keras.backend.standardize_dtype(half.dtype), list(half.shape)],
    "keep_training": bool(np.all(kept[~keep_np] == 0)),
    "keep_kept_share": float((kept[keep_np] != 0).mean()),
    "keep_inference": bool(np.array_equal(
        np.asarray(layer(x, training=False, keep=x_keep)), np.where(keep_np, 1.0, 0.0))),
    "rate_0_01": rule(Dropout(0.01, seed=4)),
    "bits_16": rule(Dropout(0.1, seed=5, bits=16)),
}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_dropout_drops_at_its_rate_keeps_the_expectation_and_draws_new_masks(backend):
    """Both backends' masks (`dropout_tf`, `dropout_jax`), in a fresh process each: 8-bit
    numbers at 0.1, 16-bit ones where 8 bits would move the rate (0.01) or when asked."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    report = run_script(DROPOUT_CHECK, backend=backend)
    assert report["backend"] == backend and report["shape"] == [201, 501]
    # 100,701 elements: the drop share's standard deviation is about 0.001.
    assert report["effective_rate"] == 26 / 256
    assert abs(report["drop_share"] - 26 / 256) < 0.005
    # Kept elements carry the inverse of the rounded keep probability: the mean stays 1.
    np.testing.assert_allclose(report["kept"], [256 / (256 - 26)], rtol=1e-6)
    assert abs(report["mean"] - 1) < 0.01
    # The numbers of one random word (and of one JAX block's two words) are independent: two
    # elements at any offset are both dropped about 1% of the time (about 100k pairs:
    # standard deviation about 0.0003).
    for both in report["both_dropped_at_offset"]:
        assert abs(both - (26 / 256) ** 2) < 0.003, report["both_dropped_at_offset"]
    # Every call draws a new mask; the same seed gives the same masks.
    assert report["new_mask_share"] > 0.1
    assert report["same_seed_same_mask"]
    assert report["inference_unchanged"] and report["rate_0_unchanged"]
    assert report["bf16"] == ["bfloat16", [7, 3, 5]]
    # `keep` zeroes where false, training or not, and the draw still drops a tenth elsewhere.
    assert report["keep_training"] and report["keep_inference"]
    assert abs(report["keep_kept_share"] - (1 - 26 / 256)) < 0.01
    # 0.01 in 8 bits would be 3/256 = 0.0117: 16 bits keep it at 655/65536.
    small = report["rate_0_01"]
    assert small["effective_rate"] == 655 / 65536
    assert abs(small["drop_share"] - 0.01) < 0.002
    np.testing.assert_allclose(small["kept"], [65536 / (65536 - 655)], rtol=1e-6)
    asked = report["bits_16"]
    assert asked["effective_rate"] == 6554 / 65536 and abs(asked["drop_share"] - 0.1) < 0.005
    np.testing.assert_allclose(asked["kept"], [65536 / (65536 - 6554)], rtol=1e-6)


def test_dropout_levels_round_the_rate_to_8_bits_unless_that_moves_it():
    from keras_transformer.layers.dropout import Dropout
    from keras_transformer.layers.dropout_levels import default_bits, effective_rate, scale

    assert [default_bits(r) for r in (0.0, 0.1, 0.3, 0.5, 0.05, 0.01, 0.001, 0.08)] == [
        8, 8, 8, 8, 8, 16, 16, 16,
    ]  # fmt: skip
    for rate in (0.001, 0.01, 0.05, 0.08, 0.1, 0.2, 0.3, 0.5, 0.9):
        assert abs(effective_rate(rate) - rate) <= 0.02 * rate, rate
        # Inverted dropout keeps the expectation: keep probability times scale is 1.
        assert (1 - effective_rate(rate)) * scale(rate) == pytest.approx(1.0)
    assert effective_rate(0.999) < 1  # one level is always kept
    with pytest.raises(ValueError, match="bits must be 8, 16 or None, got 12"):
        Dropout(0.1, bits=12)
    # A rate that its numbers cannot express would silently drop nothing.
    with pytest.raises(ValueError, match="rate 0.001 rounds to 0 with 8-bit numbers"):
        Dropout(0.001, bits=8)
    with pytest.raises(ValueError, match="rate 1e-06 rounds to 0 with 16-bit numbers"):
        Dropout(1e-6)
    assert Dropout(0.001).effective_rate == 66 / 65536  # the default rule takes 16 bits
    layer = Dropout(0.1, seed=1, bits=16)
    assert Dropout.from_config(layer.get_config()).bits == 16


FOLDED_RELU = r"""
import json, keras, numpy as np
from keras import ops
from keras_transformer.layers.feed_forward import PositionwiseFeedForward
ffn = PositionwiseFeedForward(32, dropout=0.3)
x = keras.random.normal((4, 5, 8), seed=1)
ffn.build(x.shape)
start = np.asarray(ffn.dropout_layer.seed_generator.state)

def folded(x):
    ffn.dropout_layer.seed_generator.state.assign(start)
    return ffn(x, training=True)

def separate(x):
    ffn.dropout_layer.seed_generator.state.assign(start)
    hidden = ffn.dropout_layer(ops.relu(ffn.inner_dense(x)), training=True)
    return ffn.output_dense(hidden)

if keras.config.backend() == "tensorflow":
    import tensorflow as tf
    def gradient(f):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
            loss = tf.reduce_sum(y * tf.range(y.shape[-1], dtype=y.dtype))
        return [np.asarray(g) for g in tape.gradient(loss, [x, ffn.inner_dense.kernel.value])]
else:
    import jax
    def gradient(f):
        def loss(a):
            y = f(a)
            return (y * jax.numpy.arange(y.shape[-1])).sum()
        return [np.asarray(jax.grad(loss)(x))]
pre = np.asarray(ffn.inner_dense(x))
print(json.dumps({
    "backend": keras.config.backend(),
    "negative_share": float((pre < 0).mean()),
    "outputs_equal": bool(np.array_equal(np.asarray(folded(x)), np.asarray(separate(x)))),
    "gradients_equal": all(
        np.array_equal(a, b) for a, b in zip(gradient(folded), gradient(separate))),
    "drops": bool((np.asarray(folded(x)) != np.asarray(ffn(x, training=False))).any()),
}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_feed_forward_folds_its_relu_into_the_dropout_mask_exactly(backend):
    """Training folds the ReLU into the dropout mask (`keep=x > 0`): the same outputs and
    gradients as ReLU then dropout with the same draw."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    report = run_script(FOLDED_RELU, backend=backend)
    assert report["backend"] == backend
    assert 0.3 < report["negative_share"] < 0.7  # the ReLU has work to do
    assert report["drops"]
    assert report["outputs_equal"] and report["gradients_equal"]


SHARDED_DROPOUT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from keras_transformer.layers import dropout_jax
mesh = Mesh(np.array(jax.devices()), ("batch",))
x = jax.device_put(jnp.ones((8, 6, 10), jnp.bfloat16), NamedSharding(mesh, PartitionSpec("batch")))
key = jnp.array([1, 2], jnp.uint32)
COLLECTIVES = r"all-gather|all-to-all|collective-permute|all-reduce"
dropped = jax.jit(lambda a, k: dropout_jax.dropout(a, 0.5, k))
text = dropped.lower(x, key).compile().as_text()
whole = np.asarray(dropout_jax.dropout(jnp.ones((8, 6, 10), jnp.bfloat16), 0.5, key))
print(json.dumps({
    "devices": len(jax.devices()),
    "collectives": sorted(set(re.findall(COLLECTIVES, text))),
    "same_as_unsharded": bool(np.array_equal(np.asarray(dropped(x, key)), whole)),
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_jax_dropout_masks_shard_with_the_batch():
    """Under data parallelism each device draws its own rows' numbers: no collective in the
    compiled mask (counters split in halves, as `threefry_2x32` splits them, made XLA gather
    them across devices), and the same mask as unsharded."""
    report = run_script(SHARDED_DROPOUT, backend="jax")
    assert report["devices"] == 2
    assert report["collectives"] == []
    assert report["same_as_unsharded"]


def test_dropout_config_round_trip_and_rate_check():
    from keras_transformer.layers.dropout import Dropout

    restored = Dropout.from_config(Dropout(0.1, seed=3).get_config())
    assert (restored.rate, restored.seed) == (0.1, 3)
    with pytest.raises(ValueError, match=r"Dropout rate must be in \[0, 1\), got 1.0"):
        Dropout(1.0)


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("mixed_bfloat16", 2e-2)])
def test_layer_norm_training_gradient_equals_keras_layer_normalization(
    dtype, tolerance, kernels, monkeypatch
):
    """The hand-written TensorFlow gradient, by the compiled kernels (`kernels/layer_norm.cc`)
    and by TensorFlow ops, against automatic differentiation of Keras' own layer norm, same
    weights: outputs, input gradient and both weight gradients (a gradient with a dropped
    `- xhat * mean(g * xhat)` term, `dgamma` summed over the wrong axis, or a block of rows
    left out of the kernel's column sums fails here: 75 rows are 3 of its blocks). Inference
    runs Keras' layer itself: bit for bit the same outputs."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("the hand-written gradient is TensorFlow's; other backends run Keras' norm")
    import tensorflow as tf

    from keras_transformer.kernels import native
    from keras_transformer.layers import LayerNorm

    monkeypatch.setenv(native.SWITCH, kernels)
    if kernels == "1" and native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")

    ours = LayerNorm(epsilon=1e-6, dtype=dtype)
    reference = keras.layers.LayerNormalization(epsilon=1e-6, dtype=dtype)
    x = tf.constant(rng.normal(2.0, 3.0, size=(3, 25, 16)).astype("float32"))
    ours.build(x.shape)
    reference.build(x.shape)
    ours.set_weights([rng.normal(1, 0.5, 16).astype("float32"), rng.normal(0, 0.5, 16)])
    reference.set_weights(ours.get_weights())
    upstream = tf.constant(rng.normal(size=(3, 25, 16)).astype("float32"))

    def gradients(layer, **kwargs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, **kwargs)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        return [y, *tape.gradient(loss, [x, *layer.trainable_variables])]

    for got, want in zip(gradients(ours, training=True), gradients(reference), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(tf.cast(got, tf.float32)),
            np.asarray(tf.cast(want, tf.float32)),
            rtol=tolerance,
            atol=tolerance,
        )
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(reference(x)))
    assert [w.path.split("/")[-1] for w in ours.weights] == ["gamma", "beta"]
    assert LayerNorm.from_config(ours.get_config()).epsilon == 1e-6
    with pytest.raises(ValueError, match="LayerNorm supports only center=True, got False"):
        LayerNorm(center=False)
