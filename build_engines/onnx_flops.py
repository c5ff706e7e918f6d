"""FLOPs of an ONNX graph, counted from its MatMul / Gemm / Conv nodes at given input shapes.

A multiply-add counts as 2 FLOPs. Shapes come from ONNX Runtime's symbolic shape inference after the
graph inputs are pinned to the shapes asked for, so a dynamic batch is counted at the batch given. It
follows shape arithmetic that onnx's own inference leaves unknown (an Expand to `batch * views` rows,
computed from a Squeeze of a Shape, as the HD graph has). Element-wise ops,
reductions and resizes are not counted: at these model sizes they are well under 1% of the products,
and a FLOP floor is about the matmul units anyway.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

COUNTED_OPS = ("MatMul", "Gemm", "Conv", "FusedMatMul")


class FlopCountError(RuntimeError):
    """A counted node's shapes could not be inferred."""


@dataclass
class FlopCount:
    total: int = 0
    by_op: Counter = field(default_factory=Counter)
    nodes: list[tuple[str, str, int]] = field(default_factory=list)  # (node name, op type, flops)

    @property
    def gflop(self) -> float:
        return self.total / 1e9

    def top(self, n: int = 10) -> list[tuple[str, str, int]]:
        return sorted(self.nodes, key=lambda t: -t[2])[:n]


def _shape(value_info) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if any(d is None for d in dims) else dims


def count_flops(model, input_shapes: Mapping[str, Sequence[int]]) -> FlopCount:
    """FLOPs of `model` (an onnx.ModelProto or a path; weights need not be loaded) at `input_shapes`."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(Path(model)), load_external_data=False)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    graph = model.graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    for inp in graph.input:
        if inp.name in inits:
            continue
        if inp.name not in input_shapes:
            raise FlopCountError(f"no shape given for graph input {inp.name!r}")
        dims = inp.type.tensor_type.shape.dim
        want = list(input_shapes[inp.name])
        if len(dims) != len(want):
            raise FlopCountError(f"input {inp.name!r}: rank {len(dims)} in the graph, shape {want} given")
        for d, v in zip(dims, want, strict=True):
            d.Clear()
            d.dim_value = int(v)
    # Exporters record symbolic intermediate shapes; drop them so inference fills in concrete ones.
    del graph.value_info[:]
    for out in graph.output:
        out.type.tensor_type.ClearField("shape")
    # Inference reads the values of the initializers it meets; those stored outside the graph are
    # weights, never shape arithmetic, so they become inputs of their known shape instead.
    external = [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    declared = {i.name for i in graph.input}
    for init in external:
        graph.initializer.remove(init)
        if init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model)
    shapes = dict(inits)
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        s = _shape(vi)
        if s is not None:
            shapes[vi.name] = s

    result = FlopCount()
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        flops = _node_flops(node, shapes)
        result.total += flops
        result.by_op[node.op_type] += flops
        result.nodes.append((node.name or node.output[0], node.op_type, flops))
    return result


def _node_flops(node, shapes: dict[str, list[int]]) -> int:
    def need(name):
        if name not in shapes:
            raise FlopCountError(f"{node.op_type} node {node.name!r}: shape of {name!r} unknown after inference")
        return shapes[name]

    out = need(node.output[0])
    if node.op_type in ("MatMul", "FusedMatMul"):
        a = need(node.input[0])
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[-2] if trans_a and len(a) >= 2 else a[-1]
        return 2 * prod(out) * k
    if node.op_type == "Gemm":
        a = need(node.input[0])
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        return 2 * prod(out) * (a[0] if trans_a else a[1])
    if node.op_type == "Conv":
        w = need(node.input[1])  # (C_out, C_in / groups, k...)
        return 2 * prod(out) * prod(w[1:])
    raise AssertionError(node.op_type)
