"""A toy copy task (target = source) that a tiny Transformer must learn."""

import numpy as np

from keras_transformer import TransformerConfig


def copy_task_batch(config: TransformerConfig, num_examples, min_length=3, max_length=8, seed=0):
    """Random sentences of ids in [4, vocab): source + eos, bos + target, target + eos labels."""
    rng = np.random.default_rng(seed)
    width = max_length + 1
    source = np.zeros((num_examples, width), "int32")
    target_in = np.zeros((num_examples, width), "int32")
    labels = np.zeros((num_examples, width), "int32")
    for row in range(num_examples):
        length = rng.integers(min_length, max_length + 1)
        tokens = rng.integers(4, config.vocab_size, size=length)
        source[row, :length] = tokens
        source[row, length] = config.eos_id
        target_in[row, 0] = config.bos_id
        target_in[row, 1 : length + 1] = tokens
        labels[row, :length] = tokens
        labels[row, length] = config.eos_id
    return {"source_ids": source, "target_ids": target_in}, labels
