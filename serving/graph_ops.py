"""The ops of a SavedModel, and the ones a stock `tensorflow_model_server` is known to have."""

from __future__ import annotations

from pathlib import Path

# Core TensorFlow ops the export uses, plus the three long-stable SentencePiece ops of
# tensorflow-text, which every model server since 2.2 links. Anything else (py_function's
# PyFunc/EagerPyFunc, XLA-only ops such as XlaDynamicUpdateSlice, tensorflow-addons or newer
# tf-text ops) could fail to load on a server ("Op type not registered"), so export refuses it.
# `Empty` and `InplaceUpdate` (decoding's in-place cache writes) are core array ops since TF 1.x.
ALLOWED_OPS = frozenset(
    """
    Abs AddV2 All Any ArgMax Assert AssignVariableOp BatchMatMulV2 BiasAdd Bitcast BitwiseAnd
    BroadcastTo Cast ConcatV2 Const Cumsum DisableCopyOnRead Einsum Empty Equal Exp ExpandDims
    Fill FloorDiv FloorMod GatherNd GatherV2 Greater GreaterEqual Identity IdentityN If
    InplaceUpdate IsFinite Less LessEqual Log LogicalAnd LogicalNot LogicalOr MatMul Max Maximum
    Mean MergeV2Checkpoints Min
    Minimum Mul Neg NoOp NotEqual OneHot Pack PartitionedCall Placeholder Pow Prod RaggedGather
    RaggedRange RaggedTensorToTensor Range ReadVariableOp RealDiv Relu Reshape RestoreV2 Rsqrt
    SaveV2 Select SelectV2 Shape ShardedFilename Slice Softmax SquaredDifference Squeeze
    StatefulPartitionedCall StaticRegexFullMatch StopGradient StridedSlice StringJoin
    StringLength StringStrip Sub Sum TensorScatterUpdate Tile TopKV2 Transpose UnicodeTranscode
    Unpack VarHandleOp VarIsInitializedOp Where While ZerosLike
    SentencepieceOp SentencepieceTokenizeOp SentencepieceDetokenizeOp
    """.split()  # noqa: SIM905 - a block of names reads better than 100 quoted strings
)


def saved_model_ops(saved_model_dir: str | Path) -> set[str]:
    """Every op type in the graph and in every function of its library (function calls excluded)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    ops = set()
    for graph in saved_model.meta_graphs:
        functions = {function.signature.name for function in graph.graph_def.library.function}
        ops.update(node.op for node in graph.graph_def.node)
        for function in graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
        ops -= functions
    return ops


def disallowed_ops(saved_model_dir: str | Path) -> list[str]:
    return sorted(saved_model_ops(saved_model_dir) - ALLOWED_OPS)
