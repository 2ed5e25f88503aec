"""`take_rows`: rows of a tensor at indices known to be valid, without index fix-up ops."""

from __future__ import annotations

import keras
from keras import ops


def take_rows(values, rows):
    """`values[rows]` along axis 0; `rows` is int and every entry in `[0, len(values))`.

    Keras' `ops.take` on TensorFlow first maps negative indices (`Shape`, `StridedSlice`,
    `Less`, `AddV2`, `SelectV2` around each `GatherV2`). A beam step gathers about twenty
    times, and op by op at batch 1 its time is kernel dispatches, so the searches and the
    embeddings, whose indices are never negative, gather with `tf.gather` on TensorFlow (an
    index out of range is an error on a CPU, as with `ops.take`) and `ops.take` elsewhere.
    """
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        # A tensor first, as `ops.take` does: a variable read inside a mixed-precision layer
        # is cast to its compute dtype on conversion (a `ResourceGather` would skip that).
        return tf.gather(ops.convert_to_tensor(values), rows)
    return ops.take(values, rows, axis=0)
