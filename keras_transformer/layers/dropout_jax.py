"""The JAX half of `keras_transformer.layers.dropout.Dropout`: a quarter of the random bits.

`keras.random.dropout` on JAX draws one threefry2x32 block per element (`jax.random.bernoulli`
under `jax_threefry_partitionable`, the default). On an H200 the Transformer-base training
step took 35.9 ms with it and 32.4 ms with every dropout rate at 0
(`benchmarks/results/gpu_training.json`, `gpu_training_dropout0_2026-12-04.json`); a step with
24,576 tokens per side draws about a billion numbers. Here one threefry2x32 block gives two
32-bit words, each two 16-bit uniform numbers (the rule of `dropout_levels`, the same as the
TensorFlow half): a quarter of the blocks. Measured there with the first version of this
file (counters split in halves; same number of blocks): 1.14x -> 1.20x `torch.compile`.
"""

from __future__ import annotations

from keras_transformer.layers.dropout_levels import scale, threshold


def dropout(inputs, rate: float, seed, keep=None):
    """`inputs` with each element dropped with probability `threshold(rate) / 65536` and the
    kept ones scaled by `scale(rate)` (`dropout_levels`); where the optional boolean `keep`
    (the shape of `inputs`) is false, dropped whatever the draw.

    Args:
        inputs: a float array of static shape, at least one axis.
        rate: the drop probability, in `[0, 1)`.
        seed: a threefry key, uint32 `[2]` (a `keras.random.SeedGenerator`'s `next()`).
    """
    import jax.numpy as jnp
    from jax import lax
    from jax.extend.random import threefry2x32_p

    level = threshold(rate)
    if level == 0:
        return inputs if keep is None else jnp.where(keep, inputs, jnp.zeros_like(inputs))
    seed = jnp.asarray(seed, jnp.uint32)
    *outer, width = inputs.shape
    # Block (..., j) serves elements 4j..4j+3 of its row. Its counter is its index in the
    # block array, built from per-axis iotas: every op is elementwise or on the last axis,
    # so under data parallelism each device draws only its own rows' numbers (counters
    # split in halves, as `jax.extend.random.threefry_2x32` does, make XLA gather them).
    # Counters are 32-bit: a tensor past 2**32 blocks (17 billion elements) would repeat.
    blocks = (*outer, -(-width // 4))
    counter = jnp.zeros(blocks, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(blocks))):
        counter = counter + lax.broadcasted_iota(jnp.uint32, blocks, axis) * jnp.uint32(stride)
        stride *= blocks[axis]
    first, second = threefry2x32_p.bind(seed[0], seed[1], jnp.zeros_like(counter), counter)
    numbers = jnp.concatenate(
        [lax.bitcast_convert_type(first, jnp.uint16), lax.bitcast_convert_type(second, jnp.uint16)],
        axis=-1,
    )  # (*blocks, 4): the four 16-bit halves of the block's two words
    numbers = numbers.reshape(*outer, blocks[-1] * 4)[..., :width]
    drawn = numbers >= level
    keep = drawn if keep is None else drawn & keep
    # One multiply by a 0-or-scale mask, as on TensorFlow (its gradient is one multiply).
    mask = jnp.where(keep, jnp.asarray(scale(rate), inputs.dtype), jnp.asarray(0, inputs.dtype))
    return inputs * mask
