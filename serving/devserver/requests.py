"""Validation of a PredictRequest against a signature: input aliases, dtypes, shapes, the output
filter (as TF Serving's tensorflow_serving/servables/tensorflow/predict_util.cc checks them), and
the devserver's own per-request caps (`Limits`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import grpc
import numpy as np
import tensorflow as tf

from serving.devserver.errors import ServingError

DEFAULT_SIGNATURE = "serving_default"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request caps.

    Attributes:
        max_batch_size: Most rows (size of dimension 0) an input may have: TF Serving's
            batching `max_batch_size`, which it enforces per request (INVALID_ARGUMENT "Task
            size N is larger than maximum input batch size M", `Queue::
            ValidateBatchTaskQueueCapacity` in TensorFlow's
            core/kernels/batching_util/shared_batch_scheduler.h).
        max_input_bytes: Most bytes one string element may have (for numeric inputs, elements
            per row); None, the default, for no cap. TF Serving has no such cap (predict_util.cc
            checks aliases, not sizes, and server.cc allows 2 GiB messages), and the export
            truncates what is longer than the model takes, so a cap here would refuse what the
            real server answers. It is an opt-in guard for shared development machines.
    """

    max_batch_size: int = 64
    max_input_bytes: int | None = None


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _set_text(names: Iterable[str]) -> str:
    # TF Serving prints alias sets as {a,b}, sorted.
    return "{" + ",".join(sorted(names)) + "}"


def parse_inputs(
    inputs: Mapping[str, object], specs: Mapping[str, tf.TensorSpec], limits: Limits
) -> dict[str, tf.Tensor]:
    """Turns a request's input TensorProtos into tensors the signature accepts.

    Args:
        inputs: `PredictRequest.inputs`, alias to `TensorProto`.
        specs: The signature's inputs, alias to `tf.TensorSpec`.
        limits: The devserver's caps.

    Returns:
        Alias to tensor, ready to pass to the signature function.

    Raises:
        ServingError: INVALID_ARGUMENT naming the alias and what is wrong with it.
    """
    sent, expected = set(inputs), set(specs)
    if len(sent) != len(expected):
        raise _invalid(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({_set_text(sent)}) != len({_set_text(expected)}). "
            f"Sent extra: {_set_text(sent - expected)}. "
            f"Missing but required: {_set_text(expected - sent)}."
        )
    tensors = {}
    for alias, proto in inputs.items():
        spec = specs.get(alias)
        if spec is None:
            raise _invalid(
                f"input tensor alias not found in signature: {alias}. Inputs expected to be "
                f"in the set {_set_text(expected)}."
            )
        if proto.dtype != spec.dtype.as_datatype_enum:
            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "no dtype"
            raise _invalid(f'Expects input "{alias}" to be {spec.dtype.name} but {got} is provided')
        try:
            # Tensor::FromProto refuses what TensorShape::IsValid does; make_ndarray does not.
            if proto.tensor_shape.unknown_rank or any(d.size < 0 for d in proto.tensor_shape.dim):
                raise ValueError(f"invalid shape {[d.size for d in proto.tensor_shape.dim]}")
            array = tf.make_ndarray(proto)
        except Exception as error:  # a malformed proto may fail in many ways
            raise _invalid(f"tensor parsing error: {alias}: {error}") from None
        if array.ndim == 0 and spec.shape.rank != 0:
            # What TF Serving with --enable_batching answers (ComputeTensorBatchSize,
            # tensorflow_serving/batching/batching_util.h), which is how it runs in production.
            raise _invalid(
                f'Batching Run() input tensors must have at least one dimension (input "{alias}" '
                f"is a scalar; the signature's shape is {spec.shape.as_list()})"
            )
        if not spec.shape.is_compatible_with(array.shape):
            shape = "unknown" if spec.shape.rank is None else str(spec.shape.as_list())
            raise _invalid(
                f'input "{alias}" has shape {list(array.shape)}, which does not match the '
                f"signature's shape {shape}"
            )
        _check_limits(alias, array, limits)
        tensors[alias] = tf.constant(array, dtype=spec.dtype)
    return tensors


def _check_limits(alias: str, array: np.ndarray, limits: Limits) -> None:
    if array.ndim >= 1 and array.shape[0] > limits.max_batch_size:
        # TF Serving's words (see Limits), which clients may match.
        raise _invalid(
            f"Task size {array.shape[0]} is larger than maximum input batch size "
            f'{limits.max_batch_size} (input "{alias}"; send at most max_batch_size rows)'
        )
    if limits.max_input_bytes is None:
        return
    if array.dtype == object:
        longest = max((len(value) for value in array.flat), default=0)
        if longest > limits.max_input_bytes:
            raise _invalid(
                f'input "{alias}" has a {longest}-byte string, over the devserver limit '
                f"max_input_bytes={limits.max_input_bytes}"
            )
    elif array.ndim >= 2 and array.size // max(array.shape[0], 1) > limits.max_input_bytes:
        raise _invalid(
            f'input "{alias}" has {array.size // array.shape[0]} elements per row, over the '
            f"devserver limit max_input_bytes={limits.max_input_bytes}"
        )


def check_output_filter(output_filter: Iterable[str], outputs: Iterable[str]) -> list[str]:
    """The output aliases a response holds: the filter's, in order, or all when it is empty.

    Raises:
        ServingError: INVALID_ARGUMENT for an alias the signature lacks or one named twice.
    """
    outputs = set(outputs)
    seen = []
    for alias in output_filter:
        if alias not in outputs:
            raise _invalid(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {_set_text(outputs)}."
            )
        if alias in seen:
            raise _invalid(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return seen or sorted(outputs)
