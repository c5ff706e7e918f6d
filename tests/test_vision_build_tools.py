"""The model-agnostic pieces of the vision build, on a toy two-input module (fast, no MGM weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_engines.onnx_export import OnnxExportError, describe_io, export_onnx
from build_engines.trt_engine import EngineBuildError, InputProfile, batch_profile, build_engine, import_tensorrt
from mgm_runtime.ort_runner import OrtRunner


class Toy(torch.nn.Module):
    """Two inputs with a shared dynamic batch, LayerNorm + exact GELU + a spatial mean."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, tokens, pixels):
        pooled = pixels.mean(dim=(2, 3))[:, None, :]
        return torch.nn.functional.gelu(self.norm(self.lin(tokens))) + pooled


NAMES = (["tokens", "pixels"], ["out"])
AXES = {"tokens": {0: "batch"}, "pixels": {0: "batch"}, "out": {0: "batch"}}


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, 8, generator=g), torch.randn(batch, 16, 4, 4, generator=g)


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def toy_onnx(request, tmp_path_factory):
    torch.manual_seed(0)
    model = Toy().eval()
    path = export_onnx(
        model, _inputs(2), tmp_path_factory.mktemp("toy") / "toy.onnx", *NAMES, AXES, exporter=request.param, log=None
    )
    return model, path


@pytest.mark.parametrize("batch", [1, 3])
def test_toy_export_matches_torch_with_dynamic_batch(toy_onnx, batch):
    model, path = toy_onnx
    tokens, pixels = _inputs(batch, seed=batch)
    got = OrtRunner(path, threads=1)(tokens=tokens, pixels=pixels)["out"]
    with torch.no_grad():
        want = model(tokens, pixels).numpy()
    assert got.shape == want.shape
    assert _rel_l2(got, want) < 1e-6


def test_describe_io_reports_names_dtypes_and_dynamic_batch(toy_onnx):
    io = describe_io(toy_onnx[1])
    assert [i["name"] for i in io["inputs"]] == ["tokens", "pixels"]
    assert io["inputs"][1] == {"name": "pixels", "dtype": "float32", "shape": [-1, 16, 4, 4]}
    assert io["outputs"][0]["shape"] == [-1, 5, 16]
    assert io["opset"] >= 17


def test_export_rejects_old_opset_and_bad_names(tmp_path):
    with pytest.raises(OnnxExportError, match="opset >= 17"):
        export_onnx(Toy(), _inputs(1), tmp_path / "a.onnx", *NAMES, AXES, opset=13, log=None)
    with pytest.raises(OnnxExportError, match="unknown tensors"):
        export_onnx(Toy(), _inputs(1), tmp_path / "a.onnx", *NAMES, {"nope": {0: "b"}}, log=None)


def test_ort_runner_checks_input_names(toy_onnx):
    with pytest.raises(KeyError, match="missing"):
        OrtRunner(toy_onnx[1]).run({"tokens": np.zeros((1, 5, 8), np.float32)})


def test_ort_runner_reuses_the_first_runs_memory_at_a_new_batch_size(tmp_path):
    """The second run at a shape must find its intermediates in memory the first run touched: a
    fresh block there costs a page fault per 4 KiB (seconds at MGM sizes)."""
    import resource

    from onnx import TensorProto, helper, save

    nodes = [
        helper.make_node("Add", ["x", "x"], ["a"]),
        helper.make_node("Mul", ["a", "x"], ["m"]),
        helper.make_node("Sqrt", ["m"], ["q"]),
        helper.make_node("ReduceSum", ["q"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1 << 21])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "chain.onnx")
    runner = OrtRunner(tmp_path / "chain.onnx", threads=1)
    # >= 64 MiB intermediates: above glibc's largest mmap threshold, so never recycled heap pages
    for batch in (8, 16):
        x = np.ones((batch, 1 << 21), np.float32)
        faults = []
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            runner(x=x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        pages = batch * (1 << 21) * 4 // 4096  # one intermediate
        assert faults[0] > pages  # the first run does touch fresh memory (the check can see it)
        assert faults[1] < pages // 8, faults


def test_batch_profile_follows_multimodal_builder():
    assert batch_profile(1) == (1, 1, 1)
    assert batch_profile(4) == (1, 2, 4)
    assert batch_profile(7) == (1, 3, 7)
    with pytest.raises(ValueError):
        batch_profile(0)


def test_input_profile_validates_order():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        InputProfile("x", (4, 3), (2, 3), (8, 3))


def _rtx():
    try:
        return import_tensorrt("tensorrt_rtx")
    except EngineBuildError as e:
        pytest.skip(str(e))


def _toy_profiles(max_batch=4):
    lo, mid, hi = batch_profile(max_batch)
    return [
        InputProfile("tokens", (lo, 5, 8), (mid, 5, 8), (hi, 5, 8)),
        InputProfile("pixels", (lo, 16, 4, 4), (mid, 16, 4, 4), (hi, 16, 4, 4)),
    ]


def test_tensorrt_rtx_builds_the_toy_graph(toy_onnx, tmp_path):
    _rtx()
    lines = []
    result = build_engine(
        toy_onnx[1],
        tmp_path / "model.engine",
        _toy_profiles(),
        backend="tensorrt_rtx",
        timing_cache=tmp_path / "cache",
        log=lines.append,
    )
    assert result.engine_path.stat().st_size > 0
    assert result.outputs == [{"name": "out", "dtype": "float", "shape": [-1, 5, 16]}]
    assert any("building the engine" in line for line in lines)


def test_tensorrt_rtx_reports_the_failing_node(tmp_path):
    _rtx()
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FancyUnknownOp", ["x"], ["y"], name="the_bad_node", domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(EngineBuildError) as info:
        build_engine(
            path, tmp_path / "bad.engine", [InputProfile("x", (1, 4), (1, 4), (2, 4))], backend="tensorrt_rtx", log=None
        )
    msg = str(info.value)
    assert "could not parse" in msg and "the_bad_node" in msg and "FancyUnknownOp" in msg
    assert not (tmp_path / "bad.engine").exists()


def test_profile_for_unknown_input_is_an_error(toy_onnx, tmp_path):
    _rtx()
    with pytest.raises(EngineBuildError, match="does not have"):
        build_engine(
            toy_onnx[1],
            tmp_path / "m.engine",
            [InputProfile("nope", (1,), (1,), (1,))],
            backend="tensorrt_rtx",
            log=None,
        )


def test_missing_tensorrt_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(EngineBuildError, match="tensorrt_rtx"):
        import_tensorrt("tensorrt")
