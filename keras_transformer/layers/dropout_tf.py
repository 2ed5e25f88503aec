"""The TensorFlow half of `keras_transformer.layers.dropout.Dropout`: a cheaper mask.

`keras.layers.Dropout` on TensorFlow draws one float per element (`StatelessRandomUniformV2`,
Philox), and in the profile of the `mixed_bfloat16` training step those draws were 12.6% of
kernel time (`benchmarks/results/training_profile_mixed_bfloat16.md`). Here one 32-bit Philox
draw gives four 8-bit uniform numbers (two 16-bit ones for the rates `dropout_levels` keeps at
16 bits), a quarter of the generator's work, and the mask is a comparison of integers.
Where this package's compiled kernels are available (`keras_transformer.kernels.native`),
`kernels/dropout.cc` computes the same words, masks and outputs in one pass (sixteen Philox
blocks at a time); the `small` bf16 training step: 1.048x (in turns, ad hoc).
"""

from __future__ import annotations

from keras_transformer.kernels import native
from keras_transformer.layers.dropout_levels import resolve_bits, scale, threshold


def dropout(inputs, rate: float, seed, keep=None, bits: int | None = None):
    """`inputs` with each element dropped with probability `effective_rate(rate, bits)` and
    the kept ones scaled by `scale(rate, bits)` (`dropout_levels`); where the optional boolean
    `keep` (the shape of `inputs`) is false, dropped whatever the draw.

    Args:
        inputs: a float tensor of any shape.
        rate: the drop probability, in `[0, 1)`.
        seed: a stateless seed, int `[2]` (a `keras.random.SeedGenerator`'s `next()`).
        bits: 8 or 16 bits per element's number; None: `dropout_levels`' choice.
    """
    import tensorflow as tf

    bits = resolve_bits(rate, bits)
    level = threshold(rate, bits)
    if level == 0:
        return inputs if keep is None else tf.where(keep, inputs, tf.zeros_like(inputs))
    kernels = native.kernels_for(inputs)
    if kernels is not None:
        return _kernel_dropout(kernels, inputs, seed, keep, level, bits, scale(rate, bits))
    per_word = 32 // bits
    dtype = tf.uint8 if bits == 8 else tf.uint16
    size = tf.size(inputs)
    words = tf.random.stateless_uniform(
        [(size + per_word - 1) // per_word],
        tf.cast(seed, tf.int64),
        minval=None,
        maxval=None,
        dtype=tf.uint32,
    )
    numbers = tf.reshape(tf.bitcast(words, dtype), [-1])[:size]
    drawn = tf.reshape(numbers >= tf.constant(level, dtype), tf.shape(inputs))
    keep = drawn if keep is None else tf.logical_and(drawn, keep)
    # One multiply by a 0-or-scale mask: its gradient is one multiply too, where
    # `where(keep, inputs * scale, 0)` costs a select, a zeros tensor and a multiply each
    # way (the bf16 small step: 1.036x in an in-process A/B). A NaN or inf input stays NaN
    # where dropped; the values are otherwise the same.
    mask = tf.where(
        keep,
        tf.constant(scale(rate, bits), inputs.dtype),
        tf.constant(0, inputs.dtype),
    )
    return inputs * mask


def _kernel_dropout(kernels, inputs, seed, keep, level, bits, factor):
    """The same masks and outputs as the ops path above (the same Philox words for the same
    seed), computed in one pass by `kernels/dropout.cc`; the gradient is the product with
    the mask, as the ops path's."""
    import tensorflow as tf

    # The key and counter `tf.random.stateless_uniform` derives from the seed for Philox.
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.cast(seed, tf.int64))
    keep = tf.zeros([0], tf.bool) if keep is None else keep

    @tf.custom_gradient
    def drop(x):
        y, mask = kernels.keras_transformer_dropout(
            x, key, counter, keep, threshold=level, bits=bits, scale=factor
        )
        return y, lambda upstream: upstream * mask

    return drop(inputs)
