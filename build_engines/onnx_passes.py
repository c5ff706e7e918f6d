"""Exact rewrites of an exported ONNX graph that let the runtimes fuse what the exporter spelled apart.

The dynamo exporter writes exact GELU as  x * (0.5 * (1 + erf(x / sqrt2))).  ONNX Runtime's GELU fusion
matches  (x * (1 + erf(x / sqrt2))) * 0.5  (or 0.5 * x first), so it leaves five nodes per GELU.
Moving the 0.5 to the end is bit-exact (a product with 0.5 only changes the exponent), and the fused
node does one pass over the tensor instead of five.
"""

from __future__ import annotations

import numpy as np


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _scalar(values: dict[str, np.ndarray], name: str, expected: float, rtol: float = 1e-6) -> bool:
    v = values.get(name)
    return v is not None and v.size == 1 and bool(np.isclose(float(v.reshape(-1)[0]), expected, rtol=rtol))


def _other(node, name: str) -> str | None:
    """The input of a two-input node that is not `name` (None when it is not exactly one of them)."""
    ins = list(node.input)
    if len(ins) != 2 or ins.count(name) != 1:
        return None
    return ins[1 - ins.index(name)]


def reorder_exact_gelu(graph) -> int:
    """Rewrite every  Mul(x, Mul(0.5, Add(Erf(Div(x, sqrt2)), 1)))  so the 0.5 comes last; the count."""
    values = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def only_consumer(name: str, op: str):
        found = consumers.get(name, [])
        if name in graph_outputs or len(found) != 1 or found[0].op_type != op:
            return None
        return found[0]

    rewritten = 0
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not _scalar(values, div.input[1], float(np.sqrt(2.0))):
            continue
        x = div.input[0]
        add = only_consumer(erf.output[0], "Add")
        if add is None or not _scalar(values, _other(add, erf.output[0]) or "", 1.0):
            continue
        half = only_consumer(add.output[0], "Mul")
        if half is None or not _scalar(values, (half_name := _other(half, add.output[0]) or ""), 0.5, rtol=0):
            continue
        outer = only_consumer(half.output[0], "Mul")
        if outer is None or _other(outer, half.output[0]) != x:
            continue
        half.input[:] = [x, add.output[0]]  # x * (1 + erf(x / sqrt2))
        outer.input[:] = [half.output[0], half_name]  # ... * 0.5
        rewritten += 1
    return rewritten
