"""A tiny Transformer trained for a few seconds on the copy task, shared by the decoding tests.

Random weights make degenerate decoders (one token repeated, eos never produced); a model that
has learnt to copy produces eos at different lengths, which is what decoding tests need.
"""

import functools

import keras

from keras_transformer import (
    MaskedLabelSmoothingLoss,
    TransformerConfig,
    build_transformer,
    transformer_optimizer,
)
from tests.core.copy_task import copy_task_batch


@functools.cache
def trained_copy_model(epochs=3):
    """A `tiny` model (label smoothing 0) fit on 1024 copy-task pairs; cached per process."""
    keras.utils.set_random_seed(1)
    config = TransformerConfig.preset("tiny", label_smoothing=0.0)
    model = build_transformer(config)
    model.compile(
        optimizer=transformer_optimizer(config.d_model, warmup_steps=100),
        loss=MaskedLabelSmoothingLoss(0.0, pad_id=config.pad_id),
    )
    x, y = copy_task_batch(config, 1024, seed=0)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return model


def copy_sources(config, num_examples=6, seed=7):
    """Copy-task sources (tokens then eos, 0-padded) unseen in training."""
    x, _ = copy_task_batch(config, num_examples, seed=seed)
    return x["source_ids"]
