"""The compiled TensorFlow kernels (`keras_transformer.kernels`) against the `keras.ops` path
they replace, their errors, their build cache and their fallback."""

import warnings

import keras
import numpy as np
import pytest

from keras_transformer.losses import label_is_max, label_smoothed_token_losses
from tests.subprocess_report import run_script

pytestmark = pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow kernels")


@pytest.fixture
def kernels():
    from keras_transformer.kernels import native

    library = native.library()
    if library is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    return library


def _batch(dtype, vocab=50):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(3, 7, vocab)).astype("float32")
    labels = rng.integers(1, vocab, (3, 7)).astype("int32")
    labels[1, 4:] = 0
    upstream = rng.random((3, 7)).astype("float32")
    upstream[1, 4:] = 0.0  # padding: Keras' reduction gives these tokens no gradient
    return tf.cast(logits, dtype), tf.constant(labels), tf.constant(upstream)


def _loss_and_gradient(logits, labels, upstream, smoothing, switch, monkeypatch):
    import tensorflow as tf

    from keras_transformer.kernels import native

    monkeypatch.setenv(native.SWITCH, switch)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        losses = label_smoothed_token_losses(labels, logits, smoothing)
        total = tf.reduce_sum(losses * upstream)
    gradient = tape.gradient(total, logits)
    return losses.numpy(), tf.cast(gradient, tf.float32).numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradient_equal_the_ops_path(kernels, dtype, smoothing, monkeypatch):
    logits, labels, upstream = _batch(dtype)
    fused = _loss_and_gradient(logits, labels, upstream, smoothing, "1", monkeypatch)
    plain = _loss_and_gradient(logits, labels, upstream, smoothing, "0", monkeypatch)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    if dtype == "float32":
        np.testing.assert_allclose(fused[1], plain[1], rtol=1e-5, atol=1e-7)
    else:
        # Both round the same float32 gradient to bfloat16; exponentials that differ in the
        # last float32 bits may land on the neighbouring bfloat16 value.
        np.testing.assert_allclose(fused[1], plain[1], rtol=2**-7, atol=1e-6)
        assert np.mean(fused[1] != plain[1]) < 0.01
    # Padding's gradient is exactly zero, as Keras' masked reduction makes it.
    assert not fused[1][1, 4:].any()
    assert fused[1][1, :4].any()


def test_label_is_max_counts_ties_as_the_ops_path_does(kernels, monkeypatch):
    import tensorflow as tf

    from keras_transformer.kernels import native

    logits = np.zeros((1, 3, 9), "float32")
    logits[0, 0, [3, 5]] = 2.0  # label 5 tied for the maximum: right
    logits[0, 1, 8] = 1.0  # label 7 below it: wrong
    logits[0, 2, 2] = -1.0  # label 1 at the maximum 0 of the rest: right
    labels = tf.constant([[5, 7, 1]])
    for dtype in ("float32", "bfloat16"):
        z = tf.cast(logits, dtype)
        monkeypatch.setenv(native.SWITCH, "1")
        fused = label_is_max(labels, z).numpy()
        monkeypatch.setenv(native.SWITCH, "0")
        plain = label_is_max(labels, z).numpy()
        assert fused.tolist() == plain.tolist() == [[True, False, True]]


def test_a_label_outside_the_vocabulary_is_an_error_naming_it(kernels):
    import tensorflow as tf

    logits, labels, _ = _batch("float32", vocab=50)
    labels = tf.tensor_scatter_nd_update(labels, [[2, 3]], [50])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"50 is not in \[0, 50\)"):
        label_smoothed_token_losses(labels, logits, 0.1)


def test_the_switch_takes_on_or_off_and_names_anything_else(monkeypatch):
    from keras_transformer.kernels import native

    monkeypatch.setenv(native.SWITCH, "off")
    assert native.enabled() is False and native.library() is None
    assert native.describe() == "TensorFlow ops (KERAS_TRANSFORMER_NATIVE_KERNELS=0)"
    monkeypatch.setenv(native.SWITCH, "1")
    assert native.enabled() is True
    monkeypatch.setenv(native.SWITCH, "fast")
    with pytest.raises(ValueError, match="KERAS_TRANSFORMER_NATIVE_KERNELS.*'fast'"):
        native.enabled()


def test_without_a_compiler_the_loss_says_why_and_uses_tensorflow_ops(monkeypatch, tmp_path):
    from keras_transformer.kernels import native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("KERAS_TRANSFORMER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv(native.SWITCH, "1")
    logits, labels, upstream = _batch("float32")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler 'no-such-compiler'"):
        fallback = _loss_and_gradient(logits, labels, upstream, 0.1, "1", monkeypatch)
    assert "no-such-compiler" in native.unavailable_reason()
    assert native.describe().startswith("TensorFlow ops (compiled kernels unavailable: no C++")
    plain = _loss_and_gradient(logits, labels, upstream, 0.1, "0", monkeypatch)
    np.testing.assert_array_equal(fallback[0], plain[0])
    np.testing.assert_array_equal(fallback[1], plain[1])
    # Warned once per process, not at every trace.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
    assert not list(tmp_path.glob("*.so"))


def test_the_build_is_cached_and_a_changed_source_is_built_again(monkeypatch, tmp_path):
    from keras_transformer.kernels import native

    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    monkeypatch.setenv("KERAS_TRANSFORMER_CACHE", str(tmp_path / "cache"))
    sources = tmp_path / "kernels"
    sources.mkdir()
    for path in [*native.SOURCE_DIR.glob("*.cc"), *native.SOURCE_DIR.glob("*.h")]:
        (sources / path.name).write_text(path.read_text())
    monkeypatch.setattr(native, "SOURCE_DIR", sources)
    assert native.describe().startswith("compiled (")
    first = native._build()
    built = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == built
    # The same files with other contents (an upgraded package) are another library; the
    # header counts as much as the sources.
    header = next(sources.glob("*.h"))
    header.write_text(header.read_text() + "\n// changed\n")
    second = native._build()
    assert second != first and second.exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [first.name, second.name]
    )


LAYER_NORM_SCRIPT = """
import hashlib, json, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
from keras_transformer.kernels import native
from keras_transformer.layers import layer_norm_tf
assert native.library() is not None
rng = np.random.default_rng(0)
x = tf.cast(rng.normal(size=(1000, 64)), tf.bfloat16)
gamma, beta = (tf.constant(rng.normal(size=64), tf.float32) for _ in range(2))
upstream = tf.constant(rng.normal(size=(1000, 64)), tf.float32)
with tf.GradientTape() as tape:
    tape.watch([x, gamma, beta])
    y = layer_norm_tf.layer_norm(x, gamma, beta, 1e-6)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
grads = tape.gradient(loss, [x, gamma, beta])
print(json.dumps([hashlib.sha256(g.numpy().tobytes()).hexdigest() for g in grads]))
"""


def test_layer_norm_gradients_do_not_depend_on_the_thread_count(kernels):
    """The kernel sums `dgamma`, `dbeta` per fixed block of rows, then the blocks in order;
    sums per thread's share of the rows would differ with the number of threads (and so
    between machines) in the last bits."""
    assert run_script(LAYER_NORM_SCRIPT, "1") == run_script(LAYER_NORM_SCRIPT, "2")


PROFILE_SCRIPT = """
import json, sys, tempfile
from benchmarks.profile_training_step import op_times, profile
with tempfile.TemporaryDirectory() as trace:
    profile("tiny", "mixed_bfloat16", steps=2, warmup=2, threads=2, trace_dir=trace)
    by_type, by_name, counts = op_times(trace)
print(json.dumps(counts))
"""


def test_the_training_step_runs_the_statistics_kernel_once(kernels):
    """The loss and the token accuracy each ask for the logits' statistics; TensorFlow's graph
    optimizer must merge the two calls into one run of the kernel per step (two would be a
    second full pass over `[batch, length, vocab]`)."""
    counts = run_script(PROFILE_SCRIPT)
    assert counts.get("KerasTransformerLogitStatistics") == 2  # two traced steps
    assert counts.get("KerasTransformerSmoothedCrossEntropyGrad") == 2
    assert "ArgMax" not in counts and "Exp" not in counts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rate, bits", [(0.1, None), (0.01, None), (0.3, 16)])
@pytest.mark.parametrize("shape", [(5,), (3, 7, 129), (2, 1000)])
def test_dropout_kernel_draws_the_ops_paths_masks(kernels, dtype, rate, bits, shape, monkeypatch):
    """`kernels/dropout.cc` makes the Philox words of `StatelessRandomUniformFullIntV2` itself
    (sixteen blocks at a time) and cuts them as `dropout_tf`'s bitcast does: the same seed must
    give the same outputs and gradients, bit for bit, with and without a `keep` mask, for
    8- and 16-bit numbers and sizes that end inside a block (5, 2709) or span chunks (2000)."""
    import tensorflow as tf

    from keras_transformer.kernels import native
    from keras_transformer.layers import dropout_tf

    rng = np.random.default_rng(1)
    x = tf.cast(rng.normal(size=shape), dtype)
    upstream = tf.cast(rng.normal(size=shape), dtype)
    for keep in (None, tf.constant(rng.random(shape) > 0.3)):
        results = {}
        for switch in ("1", "0"):
            monkeypatch.setenv(native.SWITCH, switch)
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = dropout_tf.dropout(x, rate, tf.constant([7, 11]), keep, bits)
            gradient = tape.gradient(y, x, output_gradients=upstream)
            results[switch] = [tf.cast(v, tf.float32).numpy() for v in (y, gradient)]
        np.testing.assert_array_equal(results["1"][0], results["0"][0])
        np.testing.assert_array_equal(results["1"][1], results["0"][1])
    dropped = np.mean(results["1"][0] == 0)
    assert dropped > 0 if x.shape.num_elements() > 100 else True


def test_the_dropout_kernel_runs_in_the_training_step(kernels, monkeypatch):
    """Every dropout of a training step is the kernel (no Philox op of TensorFlow's left)."""
    import tensorflow as tf

    from keras_transformer import TransformerConfig, build_transformer
    from keras_transformer.kernels import native

    monkeypatch.setenv(native.SWITCH, "1")
    model = build_transformer(TransformerConfig.preset("tiny", dropout=0.1))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    ids = tf.ones([2, 5], tf.int32)
    graph = (
        tf.function(model.train_step)
        .get_concrete_function(({"source_ids": ids, "target_ids": ids}, ids))
        .graph.as_graph_def()
    )
    ops = [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]
    assert ops.count("KerasTransformerDropout") > 10
    assert not [op for op in ops if op.startswith("StatelessRandomUniform")]
