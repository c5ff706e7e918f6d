"""The engine graph's re-associated patch info mining against mgm_ref's original operation order:
eager and through ONNX + ONNX Runtime, tiny and real (MGM-7B) mining sizes, fp32 / fp16, batch > 1,
non-finite inputs; and the FLOP counter that measures what the re-association saves.

Whole-graph parity (towers + mining + projector, normal and HD) is in test_vision_build.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_engines.onnx_export import export_onnx
from build_engines.onnx_flops import count_flops
from build_engines.vision import MGMVisionGraph, VisionGraphSpec, rel_l2
from build_engines.vision_graph import MiningOnly, random_mining_projectors
from mgm_ref.config import MGMConfig
from mgm_ref.loader import load_vision
from mgm_ref.vision import window_hr_features
from mgm_runtime.ort_runner import OrtRunner

pytestmark = pytest.mark.slow  # model builds and exports: seconds each (left out of `make test-fast`)

# (C_lr, C_hr, grid side P, window side M): tiny checkpoint sizes and MGM-7B's
SIZES = {"tiny": (64, 240, 24, 4), "mgm7b": (1024, 2880, 24, 8)}
AXES = {"lr": {0: "batch"}, "hr": {0: "batch"}, "tokens": {0: "batch"}}


def _inputs(size, batch, seed, dtype=torch.float32):
    c_lr, c_hr, p, m = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    lr = torch.randn(batch, p * p, c_lr, generator=g)
    hr = torch.randn(batch, c_hr, p * m, p * m, generator=g) * 2 + 0.3
    return lr.to(dtype), hr.to(dtype)


def _pair(size, seed=0):
    c_lr, c_hr, _, _ = SIZES[size]
    holder = random_mining_projectors(c_lr, c_hr, seed)
    return MiningOnly(holder, reassociated=False).eval(), MiningOnly(holder, reassociated=True).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """size, dtype -> (reference fp32 module, ORT runner over the re-associated graph in dtype)."""
    cache = {}

    def get(size, dtype="float32"):
        if (size, dtype) not in cache:
            ref, new = _pair(size)
            target = (
                new
                if dtype == "float32"
                else MiningOnly(random_mining_projectors(*SIZES[size][:2], 0).half(), reassociated=True).eval()
            )
            path = tmp_path_factory.mktemp(f"mining-{size}-{dtype}") / "mining.onnx"
            export_onnx(target, _inputs(size, 2, 0, DTYPES[dtype]), path, ["lr", "hr"], ["tokens"], AXES, log=None)
            cache[(size, dtype)] = ref, OrtRunner(path, threads=2), path
        return cache[(size, dtype)]

    return get


DTYPES = {"float32": torch.float32, "float16": torch.float16}


@pytest.mark.parametrize("size,seed", [("tiny", 1), ("tiny", 2), ("tiny", 3), ("mgm7b", 4)])
def test_eager_reassociated_mining_matches_reference(size, seed):
    ref, new = _pair(size, seed)
    lr, hr = _inputs(size, 2 if size == "tiny" else 1, seed=10 + seed)
    with torch.no_grad():
        want, got = ref(lr, hr), new(lr, hr)
    assert rel_l2(got, want) <= 1e-5
    # on the mined part alone (the residual X_L would hide an error in the mining)
    assert rel_l2(got - lr, want - lr) <= 1e-5
    # the inputs make the logits spread over several units, so the attention weights matter
    with torch.no_grad():
        keys = ref.vlm_uni_aux_projector(window_hr_features(hr, SIZES[size][2]))
        logits = (ref.vlm_uni_query_projector(lr)[:, :, None] @ keys.transpose(-1, -2)).squeeze(2) / keys.shape[
            -1
        ] ** 0.5
    assert logits.std(-1).mean() > 0.5


@pytest.mark.parametrize("size,batch", [("tiny", 1), ("tiny", 3), ("mgm7b", 1), ("mgm7b", 2)])
def test_onnxruntime_fp32_mining_matches_reference(exported, size, batch):
    ref, runner, _ = exported(size)
    lr, hr = _inputs(size, batch, seed=100 + batch)
    with torch.no_grad():
        want = ref(lr, hr)
    got = runner(lr=lr, hr=hr)["tokens"]
    err = rel_l2(got - lr.numpy(), want - lr)
    print(f"PARITY fp32 mining ({size}, batch {batch}), mined part: rel L2 {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("size", ["tiny", "mgm7b"])
def test_onnxruntime_fp16_mining_against_fp32_reference(exported, size):
    ref, runner, _ = exported(size, "float16")
    lr, hr = _inputs(size, 2, seed=7)
    with torch.no_grad():
        want = ref(lr, hr)
    got = runner(lr=lr.half(), hr=hr.half())["tokens"]
    assert got.dtype == np.float16
    err = rel_l2(got.astype(np.float32) - lr.numpy(), want - lr)
    print(f"PARITY fp16 mining ({size}) vs fp32 reference, mined part: rel L2 {err:.2e}")
    assert err <= 1e-2


def _poison(lr, hr):
    """NaN and +/-inf at a few HR pixels (two windows) and one LR token."""
    lr, hr = lr.clone(), hr.clone()
    hr[0, 5, 0, 0] = float("nan")
    hr[0, :, 9, 30] = float("inf")
    hr[-1, 3, 40, 2] = float("-inf")
    lr[-1, 17, 2] = float("nan")
    return lr, hr


@pytest.mark.parametrize("where", ["eager", "onnxruntime"])
def test_non_finite_inputs_give_the_references_non_finite_entries(exported, where):
    ref, runner, _ = exported("tiny")
    lr, hr = _poison(*_inputs("tiny", 2, seed=5))
    with torch.no_grad():
        want = ref(lr, hr).numpy()
        got = _pair("tiny")[1](lr, hr).numpy() if where == "eager" else runner(lr=lr, hr=hr)["tokens"]
    bad = ~np.isfinite(want)
    assert bad.any() and bad.any(-1).sum() < 0.1 * bad.shape[0] * bad.shape[1]  # a few tokens, not all
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    assert rel_l2(np.where(bad, 0, got), np.where(bad, 0, want)) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Whole graph, eager: towers and projector unchanged, only the mining re-associated
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hd", [False, True], ids=["normal", "hd"])
def test_graph_module_matches_reference_encoder(tiny_checkpoints, hd):
    d = tiny_checkpoints("llama", hd)
    cfg, ref = MGMConfig.from_model_dir(d), load_vision(d, torch.float32)
    images, images_aux = VisionGraphSpec.from_config(cfg).dummy_inputs(2, seed=11)
    graph = MGMVisionGraph(ref)
    assert {id(p) for p in graph.parameters()} <= {id(p) for p in ref.parameters()}  # shared, not copied
    with torch.no_grad():
        assert rel_l2(graph(images, images_aux), ref(images, images_aux)) <= 1e-5


# ------------------------------------------------------------------------------------------------
# FLOP counting
# ------------------------------------------------------------------------------------------------
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.lin = torch.nn.Linear(8, 5)

    def forward(self, x, y):
        h = self.dw(self.conv(x)).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return self.lin(h) @ y  # (B, 16, 5) @ (B, 5, 7)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_flop_counter_on_a_known_graph(tmp_path, exporter):
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 7)
    path = export_onnx(
        _Toy().eval(),
        (x, y),
        tmp_path / "toy.onnx",
        ["x", "y"],
        ["out"],
        {"x": {0: "b"}, "y": {0: "b"}, "out": {0: "b"}},
        exporter=exporter,
        log=None,
    )
    for b in (1, 3):
        want = b * (2 * 16 * 8 * 3 * 9 + 2 * 16 * 8 * 9 + 2 * 16 * 8 * 5 + 2 * 16 * 5 * 7)
        assert count_flops(path, {"x": (b, 3, 4, 4), "y": (b, 5, 7)}).total == want


class _PerView(torch.nn.Module):
    """Rows that depend on the batch through shape arithmetic, as in the HD graph: one learned row
    per view, expanded to batch * 5 views before a product."""

    def __init__(self):
        super().__init__()
        self.row = torch.nn.Parameter(torch.randn(1, 1, 8))
        self.lin = torch.nn.Linear(8, 6)

    def forward(self, x):
        rows = self.row.expand(x.shape[0] * 5, 1, 8)
        return self.lin(torch.cat([rows, x.repeat(5, 1, 1)], dim=1))


def test_flop_counter_follows_batch_arithmetic_into_shapes(tmp_path):
    x = torch.randn(2, 3, 8)
    path = export_onnx(
        _PerView().eval(), (x,), tmp_path / "views.onnx", ["x"], ["out"], {"x": {0: "b"}, "out": {0: "b"}}, log=None
    )
    for b in (1, 3):
        assert count_flops(path, {"x": (b, 3, 8)}).total == 2 * (5 * b) * 4 * 8 * 6


def test_reassociated_mining_is_30x_cheaper_at_mgm7b_sizes(exported, tmp_path):
    ref, _, new_path = exported("mgm7b")
    ref_path = export_onnx(ref, _inputs("mgm7b", 1, 0), tmp_path / "ref.onnx", ["lr", "hr"], ["tokens"], AXES, log=None)
    shapes = {"lr": (1, 576, 1024), "hr": (1, 2880, 192, 192)}
    before, after = count_flops(ref_path, shapes).gflop, count_flops(new_path, shapes).gflop
    print(
        f"mining GFLOP per 336 view at MGM-7B sizes: reference {before:.1f}, re-associated {after:.2f}, "
        f"{before / after:.0f}x"
    )
    # reference: k and v projections 2 * 36864 * 2880 * 1024 each, plus q, logits and the weighted sum
    assert 434 < before < 437
    assert before / after >= 30


@pytest.mark.parametrize("hd", [False, True], ids=["normal", "hd"])
def test_torchscript_export_of_the_graph_matches_reference(tiny_checkpoints, tmp_path, hd):
    from build_engines.vision import OUTPUT_NAME, export_vision_onnx

    d = tiny_checkpoints("gemma", hd)
    cfg, ref = MGMConfig.from_model_dir(d), load_vision(d, torch.float32)
    path = export_vision_onnx(ref, cfg, tmp_path / "model.onnx", exporter="torchscript", log=None)
    images, images_aux = VisionGraphSpec.from_config(cfg).dummy_inputs(3, seed=21)
    with torch.no_grad():
        want = ref(images, images_aux)
    got = OrtRunner(path, threads=2)(images=images, images_aux=images_aux)[OUTPUT_NAME]
    assert rel_l2(got, want) <= 1e-5
