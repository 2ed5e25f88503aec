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


def xla_compiled_functions(saved_model_dir: str | Path) -> list[str]:
    """Names of the graph's functions marked for XLA (`tf.function(jit_compile=True)`).

    A model server must compile these with XLA; `tensorflow_model_server` does so only with
    `--xla_cpu_compilation_enabled=true` (or the GPU flag), and otherwise fails the call.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    return sorted(
        function.signature.name
        for graph in saved_model.meta_graphs
        for function in graph.graph_def.library.function
        if function.attr["_XlaMustCompile"].b
    )


# Nodes that run no kernel work worth counting: constants, pass-throughs and control edges.
_TRIVIAL = frozenset({"Const", "Identity", "IdentityN", "NoOp"})
_CALLS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def decoding_step_ops(saved_model_dir: str | Path, signature: str) -> dict:
    """The ops one decoding step runs in an exported signature: the body of its decoding loop.

    The loop is the largest `While` reachable from the signature's function; its body is
    counted with the functions it calls inlined (TensorFlow inlines them before it runs the
    graph), each `If` counted with both branches. Returns `{"ops": count of nodes that run a
    kernel (not Const/Identity/NoOp), "nodes": all nodes, "copies": how many distinct traced
    copies of that loop the signature holds (a search called per shard is one),
    "xla_compiled": whether XLA compiles the loop whole (`jit_compile` export), "by_type":
    {op: count}}`. Op by op, at batch 1 a
    step costs about `ops` kernel dispatches, which is where its time goes; compiled by XLA,
    the loop is one computation and its ops are fused, with no dispatch per op.
    """
    from collections import Counter

    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0]
    functions = {f.signature.name: f for f in graph.graph_def.library.function}
    if signature not in graph.signature_def:
        raise KeyError(
            f"{saved_model_dir} has no signature {signature!r}; it has "
            f"{sorted(graph.signature_def)}"
        )
    output = next(iter(graph.signature_def[signature].outputs.values())).name.split(":")[0]
    node = next(n for n in graph.graph_def.node if n.name == output)

    def called(node):
        names = [v.func.name for v in node.attr.values() if v.HasField("func")]
        names += [f.name for v in node.attr.values() if v.HasField("list") for f in v.list.func]
        return [name for name in names if name in functions]

    def flatten(names):
        """Every node of these functions, calls inlined, `While` bodies kept as `While` nodes."""
        nodes = []
        for name in names:
            for inner in functions[name].node_def:
                if inner.op in _CALLS or inner.op in ("If", "StatelessIf"):
                    nodes.extend(flatten(called(inner)))
                    if inner.op.endswith("If"):
                        nodes.append(inner)
                else:
                    nodes.append(inner)
        return nodes

    # Functions XLA compiles whole: those marked, and everything they call.
    compiled, pending = set(), [n for n, f in functions.items() if f.attr["_XlaMustCompile"].b]
    while pending:
        name = pending.pop()
        if name not in compiled:
            compiled.add(name)
            pending.extend(callee for inner in functions[name].node_def for callee in called(inner))

    loops = []
    pending = called(node)
    while pending:
        nodes = flatten(pending)
        pending = []
        for inner in nodes:
            if inner.op in ("While", "StatelessWhile"):
                name = inner.attr["body"].func.name
                body = flatten([name])
                loops.append((body, name in compiled, name))
                pending.extend(
                    n.attr["body"].func.name for n in body if n.op in ("While", "StatelessWhile")
                )
    if not loops:
        raise ValueError(f"signature {signature!r} of {saved_model_dir} has no decoding loop")
    body, xla, _ = max(loops, key=lambda loop: len(loop[0]))
    by_type = Counter(n.op for n in body)
    copies = {name for other, _, name in loops if len(other) == len(body)}
    return {
        "ops": sum(count for op, count in by_type.items() if op not in _TRIVIAL),
        "nodes": len(body),
        "copies": len(copies),
        "xla_compiled": xla,
        "by_type": dict(by_type.most_common()),
    }
