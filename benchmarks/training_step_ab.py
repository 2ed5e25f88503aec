"""In-process A/B of training-step variants: the models alternate in short chunks.

Every variant is our `small` (or `base`) model compiled as `training.train.compile_model`
compiles it, with one thing changed; all of them live in one process and take turns, a chunk
of `--chunk` `train_on_batch` steps each, on the reference's fixed batch shape, so the
machine's drift (10-20% within an hour here) hits every variant alike. Reported: the median
step time of each variant and its ratio to the first.

Variants (`--variants`, comma-separated; the first is the baseline):
  `ours`        the training step as runs compile it
  `keras_adam`  Keras' own `keras.optimizers.Adam` (same settings and schedule) instead of ours
  `jit`         `jit_compile=True`
  `keras_ln`    Keras' own `keras.layers.LayerNormalization` (automatic differentiation)
                instead of our `LayerNorm` (hand-written gradient) in every residual block
  `relu_ffn`    the feed-forward ReLU as its own op before the dropout (before it was folded
                into the dropout mask)
  `argmax_acc`  the token accuracy as an arg-max over the logits (before it reused the loss's
                maximum)
  `dropout16`   every dropout mask from 16-bit numbers, two per random word (`Dropout(bits=16)`;
                before the 8-bit numbers of `dropout_levels`)
  `tf_ops`      the loss, layer norm and dropout by TensorFlow ops instead of the compiled
                kernels (`KERAS_TRANSFORMER_NATIVE_KERNELS=0` while its step is traced)

Bounds, not candidates (models that compute something else; each says how much wall time
that part of the step takes, so at most what any speed-up of it can give; a profile's kernel
times overstate ops that run beside others):
  `no_dropout`     every dropout rate 0 (no random numbers, no masks)
  `no_layer_norm`  every residual block's layer norm replaced by the identity

    .venv/bin/python benchmarks/training_step_ab.py --preset small --mode mixed_bfloat16 \
        --variants keras_adam,ours --steps 40 --output benchmarks/results/training_step_ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.training_throughput import SHAPES, step_seconds  # noqa: E402
from quiet_logs import add_verbose_argument, quiet_tensorflow  # noqa: E402

VARIANTS = (
    "ours",
    "keras_adam",
    "jit",
    "keras_ln",
    "argmax_acc",
    "relu_ffn",
    "dropout16",
    "tf_ops",
    "no_dropout",
    "no_layer_norm",
)


@contextlib.contextmanager
def _swapped(module, name, replacement):
    """`module.name` is `replacement` inside the block, and what it was after it."""
    ours = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, ours)


@contextlib.contextmanager
def _kernels_switch(value):
    """`KERAS_TRANSFORMER_NATIVE_KERNELS` is `value` inside the block, as it was after it."""
    import os

    from keras_transformer.kernels import native

    before = os.environ.get(native.SWITCH)
    os.environ[native.SWITCH] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[native.SWITCH]
        else:
            os.environ[native.SWITCH] = before


def _argmax_accuracy():
    from keras import ops

    from keras_transformer import MaskedTokenAccuracy

    class ArgMaxTokenAccuracy(MaskedTokenAccuracy):
        """The accuracy as it was: an arg-max over the `[batch, length, vocab]` logits."""

        def update_state(self, y_true, y_pred, sample_weight=None):
            y_true = ops.cast(y_true, "int32")
            mask = ops.cast(ops.not_equal(y_true, self.pad_id), "float32")
            predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
            hits = ops.cast(ops.equal(predicted, y_true), "float32")
            self.correct.assign_add(ops.sum(hits * mask))
            self.total.assign_add(ops.sum(mask))

    return ArgMaxTokenAccuracy


def _relu_first_feed_forward(base):
    class ReluFirstFeedForward(base):
        """`PositionwiseFeedForward` as it was: the ReLU, then the dropout."""

        def call(self, inputs, training=None):
            hidden = self.activation(self.inner_dense(inputs))
            return self.output_dense(self.dropout_layer(hidden, training=training))

    return ReluFirstFeedForward


def _identity_norm():
    import keras

    class IdentityNorm(keras.layers.Layer):
        """Stands where `LayerNorm` stands and returns its input (the `no_layer_norm` bound)."""

        def __init__(self, epsilon=None, **kwargs):
            super().__init__(**kwargs)

        def call(self, inputs, training=None):
            return inputs

    return IdentityNorm


def build(preset: str, mode: str, variant: str):
    """Our model compiled as a run compiles it, with `variant`'s one change."""
    import dataclasses

    import keras

    from keras_transformer import TransformerConfig, build_transformer
    from training.run_config import TrainConfig
    from training.train import compile_model

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("float32" if mode == "float32" else mode)
    rates = {"dropout": 0.0, "attention_dropout": 0.0} if variant == "no_dropout" else {}
    config = TransformerConfig.preset(preset, **rates)
    # Each variant swaps one name that our code looks up while building or compiling.
    if variant == "relu_ffn":
        # The layers build whatever `transformer_layer.PositionwiseFeedForward` names.
        from keras_transformer.layers import transformer_layer

        ours = transformer_layer.PositionwiseFeedForward
        with _swapped(transformer_layer, "PositionwiseFeedForward", _relu_first_feed_forward(ours)):
            model = build_transformer(config)
        ffns = [n for n in model._flatten_layers() if isinstance(n, ours)]
        assert ffns and all(type(n) is not ours for n in ffns)
    elif variant == "keras_ln":
        # ResidualBlock builds whatever `residual.LayerNorm` names: Keras' own, here.
        from keras_transformer.layers import residual

        with _swapped(residual, "LayerNorm", keras.layers.LayerNormalization):
            model = build_transformer(config)
        norms = [n for n in model._flatten_layers() if n.name == "layer_norm"]
        assert norms and all(type(n) is keras.layers.LayerNormalization for n in norms)
    elif variant == "no_layer_norm":
        from keras_transformer.layers import residual

        IdentityNorm = _identity_norm()
        with _swapped(residual, "LayerNorm", IdentityNorm):
            model = build_transformer(config)
        norms = [n for n in model._flatten_layers() if n.name == "layer_norm"]
        assert norms and all(type(n) is IdentityNorm for n in norms)
    else:
        model = build_transformer(config)
    if variant in ("no_dropout", "dropout16"):
        from keras_transformer.layers.dropout import Dropout

        drops = [n for n in model._flatten_layers() if isinstance(n, Dropout)]
        assert drops
        if variant == "no_dropout":
            assert all(n.rate == 0 for n in drops)
        else:
            for layer in drops:
                layer.bits = 16  # read when the step is traced, on its first call
    opts = TrainConfig(mixed_precision=None if mode == "float32" else mode, jit_compile=False)
    if variant == "jit":
        opts = dataclasses.replace(opts, jit_compile=True)
    if variant == "argmax_acc":
        import keras_transformer

        ArgMaxTokenAccuracy = _argmax_accuracy()
        with _swapped(keras_transformer, "MaskedTokenAccuracy", ArgMaxTokenAccuracy):
            compile_model(model, config, opts)
        assert isinstance(model._compile_metrics._user_metrics[0], ArgMaxTokenAccuracy)
    elif variant == "keras_adam":
        # transformer_optimizer builds whatever `schedules.Adam` names: Keras' own, here.
        from keras_transformer import schedules

        with _swapped(schedules, "Adam", keras.optimizers.Adam):
            compile_model(model, config, opts)
        assert type(model.optimizer) is keras.optimizers.Adam
    else:
        compile_model(model, config, opts)
    return model, config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(SHAPES))
    parser.add_argument("--mode", default="mixed_bfloat16", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--variants", default="keras_adam,ours")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--chunk", type=int, default=4, help="steps per turn")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or len(variants) < 2:
        parser.error(
            f"--variants needs two or more of {', '.join(VARIANTS)}; got {args.variants!r}"
        )
    quiet_tensorflow()
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    models = {}
    for variant in variants:
        models[variant], config = build(args.preset, args.mode, variant)
    rows, length = SHAPES[args.preset]
    rng = np.random.default_rng(0)
    source = rng.integers(4, config.vocab_size, (rows, length)).astype("int32")
    target = rng.integers(4, config.vocab_size, (rows, length + 1)).astype("int32")
    inputs, labels = {"source_ids": source, "target_ids": target[:, :-1]}, target[:, 1:]
    for variant, model in models.items():
        # The first call traces the step; the kernels switch is read while it does.
        with _kernels_switch("0" if variant == "tf_ops" else "1"):
            for _ in range(args.warmup):
                model.train_on_batch(inputs, labels)
    times = {v: [] for v in variants}
    while min(len(t) for t in times.values()) < args.steps:
        for variant, model in models.items():
            times[variant] += [step_seconds(model, inputs, labels) for _ in range(args.chunk)]
    base = statistics.median(times[variants[0]])
    result = {
        "benchmark": "training_step_ab",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": args.preset,
        "mode": args.mode,
        "batch": f"{rows} x {length}",
        "chunk": args.chunk,
        "variants": {
            v: {
                "step_s_median": statistics.median(t),
                "step_s_quartiles": [float(q) for q in np.quantile(t, [0.25, 0.75])],
                "steps": len(t),
                "speedup_over_" + variants[0]: base / statistics.median(t),
            }
            for v, t in times.items()
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
