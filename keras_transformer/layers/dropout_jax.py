"""The JAX half of `keras_transformer.layers.dropout.Dropout`: an eighth of the random blocks.

`keras.random.dropout` on JAX draws one threefry2x32 block per element (`jax.random.bernoulli`
under `jax_threefry_partitionable`, the default). On an H200 the Transformer-base training
step took 35.9 ms with it and 32.4 ms with every dropout rate at 0
(`benchmarks/results/gpu_training.json`, `gpu_training_dropout0_2026-12-04.json`); a step with
24,576 tokens per side draws about a billion numbers. Here one threefry2x32 block gives two
32-bit words, each four 8-bit uniform numbers (two 16-bit ones for the rates `dropout_levels`
keeps at 16 bits; the rule of `dropout_levels`, the same as the TensorFlow half): an eighth of
the blocks. Measured there with the first version of this file (16-bit numbers, a quarter of
the blocks; counters split in halves): 1.14x -> 1.20x `torch.compile`. The 8-bit numbers are
not measured on a GPU yet.
"""

from __future__ import annotations

from keras_transformer.layers.dropout_levels import resolve_bits, scale, threshold


def dropout(inputs, rate: float, seed, keep=None, bits: int | None = None):
    """`inputs` with each element dropped with probability `effective_rate(rate, bits)` and
    the kept ones scaled by `scale(rate, bits)` (`dropout_levels`); where the optional boolean
    `keep` (the shape of `inputs`) is false, dropped whatever the draw.

    Args:
        inputs: a float array of static shape, at least one axis.
        rate: the drop probability, in `[0, 1)`.
        seed: a threefry key, uint32 `[2]` (a `keras.random.SeedGenerator`'s `next()`).
        bits: 8 or 16 bits per element's number; None: `dropout_levels`' choice.
    """
    import jax.numpy as jnp
    from jax import lax
    from jax.extend.random import threefry2x32_p

    bits = resolve_bits(rate, bits)
    level = threshold(rate, bits)
    if level == 0:
        return inputs if keep is None else jnp.where(keep, inputs, jnp.zeros_like(inputs))
    seed = jnp.asarray(seed, jnp.uint32)
    dtype = jnp.uint8 if bits == 8 else jnp.uint16
    per_block = 2 * (32 // bits)
    *outer, width = inputs.shape
    # Block (..., j) serves elements `per_block` * j ... of its row. Its counter is its index
    # in the block array, built from per-axis iotas: every op is elementwise or on the last
    # axis, so under data parallelism each device draws only its own rows' numbers (counters
    # split in halves, as `jax.extend.random.threefry_2x32` does, make XLA gather them).
    # Counters are 32-bit: past 2**32 blocks (17 or 34 billion elements) they would repeat.
    blocks = (*outer, -(-width // per_block))
    counter = jnp.zeros(blocks, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(blocks))):
        counter = counter + lax.broadcasted_iota(jnp.uint32, blocks, axis) * jnp.uint32(stride)
        stride *= blocks[axis]
    first, second = threefry2x32_p.bind(seed[0], seed[1], jnp.zeros_like(counter), counter)
    numbers = jnp.concatenate(
        [lax.bitcast_convert_type(first, dtype), lax.bitcast_convert_type(second, dtype)],
        axis=-1,
    )  # (*blocks, per_block): the 8- or 16-bit pieces of the block's two words
    numbers = numbers.reshape(*outer, blocks[-1] * per_block)[..., :width]
    drawn = numbers >= level
    keep = drawn if keep is None else drawn & keep
    # One multiply by a 0-or-scale mask, as on TensorFlow (its gradient is one multiply).
    mask = jnp.where(
        keep, jnp.asarray(scale(rate, bits), inputs.dtype), jnp.asarray(0, inputs.dtype)
    )
    return inputs * mask
