"""The JAX half of `keras_transformer.layers.dropout.Dropout`: a quarter of the random bits.

`keras.random.dropout` on JAX draws one threefry2x32 block per element (`jax.random.bernoulli`
under `jax_threefry_partitionable`, the default). On an H200 dropout cost about 10% of the
Transformer-base training step: 35.9 ms with it, 32.4 ms with every rate at 0
(`benchmarks/results/gpu_training_profile.md`), and a step with 24,576 tokens per side draws
about a billion numbers, so the generator, not memory, is the cost. Here one threefry2x32 block
gives two 32-bit words, each two 16-bit uniform numbers (the rule of `dropout_levels`, the same
as the TensorFlow half): a quarter of the blocks.
"""

from __future__ import annotations

import math

from keras_transformer.layers.dropout_levels import scale, threshold


def dropout(inputs, rate: float, seed):
    """`inputs` with each element dropped with probability `threshold(rate) / 65536` and the
    kept ones scaled by `scale(rate)` (`dropout_levels`).

    Args:
        inputs: a float array of static shape.
        rate: the drop probability, in `[0, 1)`.
        seed: a threefry key, uint32 `[2]` (a `keras.random.SeedGenerator`'s `next()`).
    """
    import jax.numpy as jnp
    from jax import lax
    from jax.extend.random import threefry_2x32

    level = threshold(rate)
    if level == 0:
        return inputs
    size = math.prod(inputs.shape)
    seed = jnp.asarray(seed, jnp.uint32)
    # Counter mode: block i hashes the counters (i, i + n/2) into words i and i + n/2.
    words = threefry_2x32((seed[0], seed[1]), lax.iota(jnp.uint32, (size + 1) // 2))
    numbers = lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size]
    keep = numbers.reshape(inputs.shape) >= level
    # One multiply by a 0-or-scale mask, as on TensorFlow (its gradient is one multiply).
    mask = jnp.where(keep, jnp.asarray(scale(rate), inputs.dtype), jnp.asarray(0, inputs.dtype))
    return inputs * mask
