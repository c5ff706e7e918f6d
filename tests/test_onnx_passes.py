"""The exact-GELU rewrite of exported graphs: bit-exact before fusion, and ONNX Runtime fuses it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

import build_engines.onnx_passes as passes
from build_engines.onnx_export import export_onnx


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) + torch.nn.functional.gelu(x)


def export(path):
    torch.manual_seed(0)
    return export_onnx(Mlp(), (torch.randn(2, 16),), path, ["x"], ["y"], {"x": {0: "b"}}, log=None)


def session(path, level, optimized_to=None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    if optimized_to:
        opts.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_every_exact_gelu_is_fused_by_onnx_runtime(tmp_path):
    path = export(tmp_path / "mlp.onnx")
    assert ops(path).count("Erf") == 2
    session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path / "opt.onnx")
    fused = ops(tmp_path / "opt.onnx")
    assert fused.count("Gelu") + fused.count("BiasGelu") == 2 and "Erf" not in fused


def test_the_rewrite_is_bit_exact(tmp_path, monkeypatch):
    path = export(tmp_path / "mlp.onnx")
    assert passes.reorder_exact_gelu(onnx.load(str(path)).graph) == 0  # nothing left to rewrite
    with monkeypatch.context() as m:  # the exporter's own spelling
        m.setattr(passes, "reorder_exact_gelu", lambda graph: 0)
        raw = export(tmp_path / "raw.onnx")
    assert passes.reorder_exact_gelu(onnx.load(str(raw)).graph) == 2
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32) * 4
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = session(raw, off).run(None, {"x": x})[0]
    np.testing.assert_array_equal(session(path, off).run(None, {"x": x})[0], want)
    fused = session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"x": x})[0]
    assert np.linalg.norm(fused - want) / np.linalg.norm(want) < 1e-6
