"""`mgm-build vision` on tiny MGM checkpoints: ONNX parity with mgm_ref, TensorRT-RTX parse+build,
the artifact's config.json, and the error paths.

Parity is measured on fresh random inputs (not the export's or the build check's) against the
float32 mgm_ref encoder loaded from the same checkpoint.

Over 400 lines: one file per command under test (`mgm-build vision`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from build_engines.trt_engine import EngineBuildError, build_engine, import_tensorrt
from build_engines.vision import (
    INPUT_NAMES,
    OUTPUT_NAME,
    MGMVisionGraph,
    VisionBuildError,
    VisionGraphSpec,
    add_vision_arguments,
    build_vision,
    main,
    rel_l2,
    run_vision_build,
)
from mgm_ref.config import MGMConfig
from mgm_ref.errors import CheckpointError, MGMError
from mgm_ref.loader import load_vision
from mgm_runtime.vision_artifact import load_vision_artifact

pytestmark = pytest.mark.slow  # model builds and exports: seconds each (left out of `make test-fast`)

MODELS = [("llama", False), ("llama", True), ("gemma", False), ("gemma", True)]
MODEL_IDS = [f"{llm}-{'hd' if hd else 'normal'}" for llm, hd in MODELS]


def _args(**kw) -> argparse.Namespace:
    argv = []
    for k, v in kw.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None:
            argv += [f"--{k}", str(v)]
    return add_vision_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="session")
def checkpoints(tiny_checkpoints):
    return {(llm, hd): tiny_checkpoints(llm, hd) for llm, hd in MODELS}


@pytest.fixture(scope="session")
def references(checkpoints):
    return {key: (MGMConfig.from_model_dir(d), load_vision(d, torch.float32)) for key, d in checkpoints.items()}


@pytest.fixture(scope="session")
def ort_artifacts(checkpoints, tmp_path_factory):
    """(llm, hd, dtype) -> folder built by the CLI entry point with --backend onnxruntime (lazily)."""
    root = tmp_path_factory.mktemp("artifacts")
    cache = {}

    def get(llm, hd, dtype):
        key = (llm, hd, dtype)
        if key not in cache:
            out = root / f"{llm}-{hd}-{dtype}"
            run_vision_build(
                _args(
                    model_dir=checkpoints[(llm, hd)],
                    output_dir=out,
                    backend="onnxruntime",
                    dtype=dtype,
                    max_batch_size=4,
                    quiet=True,
                )
            )
            cache[key] = out
        return cache[key]

    return get


def _fresh_inputs(cfg, batch, seed):
    return VisionGraphSpec.from_config(cfg).dummy_inputs(batch, torch.float32, seed=seed)


# ------------------------------------------------------------------------------------------------
# Parity: ONNX Runtime vs mgm_ref
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("llm,hd", MODELS, ids=MODEL_IDS)
def test_onnxruntime_fp32_matches_mgm_ref(ort_artifacts, references, llm, hd, batch):
    cfg, ref = references[(llm, hd)]
    config, runner = load_vision_artifact(ort_artifacts(llm, hd, "float32"), threads=2)
    images, images_aux = _fresh_inputs(cfg, batch, seed=100 + batch)
    with torch.no_grad():
        want = ref(images, images_aux)
    got = runner(images=images.numpy(), images_aux=images_aux.numpy())[OUTPUT_NAME]
    assert got.shape == (batch, cfg.tokens_per_image, cfg.hidden_size) == tuple(want.shape)
    assert got.dtype == np.float32
    err = rel_l2(got, want)
    print(f"PARITY fp32 graph vs fp32 mgm_ref, {llm} {'HD' if hd else 'normal'} batch {batch}: rel L2 {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("llm,hd", MODELS, ids=MODEL_IDS)
def test_onnxruntime_fp16_graph_against_fp32_mgm_ref(ort_artifacts, references, llm, hd, batch):
    cfg, ref = references[(llm, hd)]
    config, runner = load_vision_artifact(ort_artifacts(llm, hd, "float16"), threads=2)
    assert [i["dtype"] for i in config["inputs"]] == ["float16", "float16"]
    images, images_aux = _fresh_inputs(cfg, batch, seed=200 + batch)
    with torch.no_grad():
        want = ref(images, images_aux)
    got = runner(images=images.numpy(), images_aux=images_aux.numpy())[OUTPUT_NAME]
    assert got.dtype == np.float16 and got.shape == tuple(want.shape)
    err = rel_l2(got, want)
    print(f"PARITY fp16 graph vs fp32 mgm_ref, {llm} {'HD' if hd else 'normal'} batch {batch}: rel L2 {err:.2e}")
    assert err <= 1e-2


def test_graph_is_the_reference_forward_with_mining_reassociated(references):
    cfg, ref = references[("llama", True)]
    images, images_aux = _fresh_inputs(cfg, 2, seed=7)
    with torch.no_grad():
        assert rel_l2(MGMVisionGraph(ref)(images, images_aux), ref(images, images_aux)) <= 1e-5


def test_spec_shapes_follow_the_variant(references):
    normal = VisionGraphSpec.from_config(references[("gemma", False)][0])
    hd = VisionGraphSpec.from_config(references[("gemma", True)][0])
    assert normal.input_shapes == {"images": (3, 336, 336), "images_aux": (3, 768, 768)}
    assert hd.input_shapes == {"images": (5, 3, 336, 336), "images_aux": (3, 1536, 1536)}
    assert (normal.tokens_per_image, hd.tokens_per_image) == (576, 2880)
    assert [p.max[0] for p in hd.profiles(6)] == [6, 6] and [p.opt[0] for p in hd.profiles(6)] == [3, 3]


# ------------------------------------------------------------------------------------------------
# The artifact's config.json
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("llm,hd", [("gemma", False), ("llama", True)], ids=["gemma-normal", "llama-hd"])
def test_onnxruntime_artifact_config(ort_artifacts, references, llm, hd):
    cfg, _ = references[(llm, hd)]
    folder = ort_artifacts(llm, hd, "float32")
    config = json.loads((folder / "config.json").read_text())
    tokens = 2880 if hd else 576
    assert config["model_type"] == "mgm" and config["backend"] == "onnxruntime"
    assert config["file"] == "model.onnx" and (folder / "model.onnx").is_file()
    assert config["dtype"] == config["precision"] == "float32"
    assert config["max_batch_size"] == 4 and config["profile"] == {"min": 1, "opt": 2, "max": 4}
    assert [i["name"] for i in config["inputs"]] == list(INPUT_NAMES)
    assert config["inputs"][0]["per_image_shape"] == ([5, 3, 336, 336] if hd else [3, 336, 336])
    assert config["inputs"][1]["shape"] == [-1, 3, cfg.image_size_aux, cfg.image_size_aux]
    assert config["outputs"] == [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, tokens, cfg.hidden_size]}]
    assert config["tokens_per_image"] == tokens and config["hidden_size"] == cfg.hidden_size
    assert config["builder_config"]["model_type"] == "mgm"
    assert config["parity"]["onnxruntime_vs_pytorch_fp32_rel_l2"] <= 1e-5
    assert config["onnx_opset"] >= 17


# ------------------------------------------------------------------------------------------------
# TensorRT-RTX: every exported graph parses and builds (no GPU needed)
# ------------------------------------------------------------------------------------------------
def _require_rtx():
    try:
        import_tensorrt("tensorrt_rtx")
    except EngineBuildError as e:
        pytest.skip(f"TensorRT-RTX is not installed: {e}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("llm,hd", MODELS, ids=MODEL_IDS)
def test_tensorrt_rtx_parses_and_builds_each_exported_graph(ort_artifacts, references, tmp_path, llm, hd, dtype):
    _require_rtx()
    cfg, _ = references[(llm, hd)]
    spec = VisionGraphSpec.from_config(cfg)
    result = build_engine(
        ort_artifacts(llm, hd, dtype) / "model.onnx",
        tmp_path / "model.engine",
        spec.profiles(4),
        backend="tensorrt_rtx",
        log=None,
    )
    assert result.engine_bytes > 0
    trt_dtype = {"float32": "float", "float16": "half"}[dtype]
    assert result.outputs == [
        {"name": OUTPUT_NAME, "dtype": trt_dtype, "shape": [-1, spec.tokens_per_image, spec.hidden_size]}
    ]
    assert [i["shape"] for i in result.inputs] == [[-1, *spec.images_shape], [-1, *spec.images_aux_shape]]


@pytest.mark.parametrize(
    "llm,hd,dtype",
    [("llama", False, "float16"), ("gemma", True, "bfloat16")],
    ids=["llama-normal-fp16", "gemma-hd-bf16"],
)
def test_cli_builds_tensorrt_rtx_engine_folder(checkpoints, references, tmp_path, capsys, llm, hd, dtype):
    _require_rtx()
    out = tmp_path / "vision"
    rc = main(
        [
            "--model_dir",
            str(checkpoints[(llm, hd)]),
            "--output_dir",
            str(out),
            "--backend",
            "tensorrt_rtx",
            "--dtype",
            dtype,
            "--max_batch_size",
            "3",
        ]
    )
    assert rc == 0
    logs = capsys.readouterr().out
    assert "step 1/3" in logs and "step 3/3" in logs
    assert "engine run check skipped" in logs or "engine vs PyTorch" in logs
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.engine"]  # ONNX removed, like TRT-LLM
    config = json.loads((out / "config.json").read_text())
    cfg, _ = references[(llm, hd)]
    assert config["backend"] == "tensorrt_rtx" and config["file"] == "model.engine"
    assert config["dtype"] == config["builder_config"]["precision"] == dtype
    assert config["profile"] == {"min": 1, "opt": 1, "max": 3}
    assert config["output_shape"] == [-1, cfg.tokens_per_image, cfg.hidden_size]
    assert config["library"]["name"] == "tensorrt_rtx"
    assert [i["dtype"] for i in config["inputs"]] == [dtype, dtype]


def test_keep_onnx_keeps_the_graph_beside_the_engine(references, tmp_path):
    _require_rtx()
    cfg, ref = references[("llama", False)]
    config = build_vision(
        ref,
        cfg,
        tmp_path,
        dtype="float32",
        max_batch_size=2,
        backend="tensorrt_rtx",
        keep_onnx=True,
        verify=False,
        log=lambda m: None,
    )
    assert (tmp_path / config["onnx"]).is_file() and (tmp_path / "model.engine").is_file()


# ------------------------------------------------------------------------------------------------
# Running an engine: GPU only
# ------------------------------------------------------------------------------------------------
def _gpu_backend():
    if not torch.cuda.is_available():
        pytest.skip(
            "running a TensorRT engine needs an NVIDIA GPU; this host has none (torch.cuda.is_available() is False)"
        )
    for backend in ("tensorrt", "tensorrt_rtx"):
        try:
            import_tensorrt(backend)
            return backend
        except EngineBuildError:
            continue
    pytest.skip("a GPU is present but neither tensorrt nor tensorrt_rtx is installed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("float16", 1e-2)])
@pytest.mark.parametrize("llm,hd", [("llama", False), ("gemma", True)], ids=["llama-normal", "gemma-hd"])
def test_engine_runs_on_gpu_and_matches_mgm_ref(checkpoints, references, tmp_path, llm, hd, dtype, tol):
    backend = _gpu_backend()
    cfg, ref = references[(llm, hd)]
    build_vision(ref, cfg, tmp_path, dtype=dtype, max_batch_size=4, backend=backend, verify=False, log=lambda m: None)
    _, runner = load_vision_artifact(tmp_path)
    for batch in (1, 3):
        images, images_aux = _fresh_inputs(cfg, batch, seed=300 + batch)
        with torch.no_grad():
            want = ref(images, images_aux)
        got = runner(images=images, images_aux=images_aux)[OUTPUT_NAME]
        assert rel_l2(got, want) <= tol


# ------------------------------------------------------------------------------------------------
# The engine run check after a GPU build: skipped only where the engine cannot run, else enforced
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu_build(monkeypatch, references, tmp_path):
    """build_vision with TensorRT-RTX on a pretend SM86 GPU, the engine build itself stubbed out;
    returns build(verify_engine replacement) -> build_vision's result."""
    import build_engines.vision as vision
    from build_engines.trt_engine import BuildResult

    _require_rtx()

    def fake_build(onnx_path, engine_path, *a, **kw):
        engine_path.write_bytes(b"engine")
        # the GPU appears after the export (the exporter itself looks for CUDA)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
        return BuildResult(engine_path, "tensorrt_rtx", "x")

    monkeypatch.setattr(vision, "build_engine", fake_build)
    cfg, ref = references[("llama", False)]

    def build(verify_engine):
        monkeypatch.undo()
        monkeypatch.setattr(vision, "build_engine", fake_build)
        monkeypatch.setattr(vision, "verify_engine", verify_engine)
        return build_vision(
            ref, cfg, tmp_path / "out", dtype="float32", max_batch_size=2, backend="tensorrt_rtx", log=lambda m: None
        )

    return build


def test_engine_that_fails_to_run_on_a_capable_gpu_fails_the_build(fake_gpu_build):
    def broken(*a, **kw):
        raise RuntimeError("execute_async_v3 failed: illegal memory access")

    with pytest.raises(VisionBuildError, match="running it on this GPU failed: RuntimeError: execute_async_v3"):
        fake_gpu_build(broken)


def test_engine_parity_above_tolerance_fails_the_build(fake_gpu_build):
    with pytest.raises(VisionBuildError, match="engine does not match PyTorch: relative L2 3.000e-01"):
        fake_gpu_build(lambda *a, **kw: 0.3)
    assert fake_gpu_build(lambda *a, **kw: 2e-6)["parity"]["tensorrt_rtx_vs_pytorch_fp32_rel_l2"] == 2e-6


def test_engine_run_check_is_skipped_only_where_the_engine_cannot_run(monkeypatch):
    from build_engines.vision import engine_cannot_run_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in engine_cannot_run_here("tensorrt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # H100/H200
    assert "SM90" in engine_cannot_run_here("tensorrt_rtx")
    assert "SM90" in engine_cannot_run_here("tensorrt_rtx", ["SM86"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert "SM86" in engine_cannot_run_here("tensorrt_rtx", ["SM89"])
    monkeypatch.setitem(__import__("sys").modules, "tensorrt_rtx", None)
    assert "no TensorRT runtime" in engine_cannot_run_here("tensorrt_rtx")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        run_vision_build(_args(model_dir=tmp_path / "nope", output_dir=tmp_path / "out", backend="onnxruntime"))


def test_folder_without_config_json(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        run_vision_build(
            _args(model_dir=tmp_path / "ckpt", output_dir=tmp_path / "out", backend="onnxruntime", quiet=True)
        )


def test_incomplete_checkpoint_names_the_missing_shard(checkpoints, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[("llama", False)], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        run_vision_build(_args(model_dir=broken, output_dir=tmp_path / "out", backend="onnxruntime", quiet=True))


def test_unwritable_output_dir_fails_before_loading(checkpoints, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(VisionBuildError, match="not writable"):
        run_vision_build(
            _args(
                model_dir=checkpoints[("llama", False)], output_dir=blocker / "out", backend="onnxruntime", quiet=True
            )
        )


def test_unsupported_dtype(references, tmp_path, capsys):
    cfg, ref = references[("llama", False)]
    with pytest.raises(VisionBuildError, match="int8"):
        build_vision(ref, cfg, tmp_path, dtype="int8", backend="onnxruntime", log=lambda m: None)
    with pytest.raises(SystemExit):
        main(["--model_dir", "x", "--output_dir", str(tmp_path), "--dtype", "float64"])
    assert "invalid choice" in capsys.readouterr().err


def test_bfloat16_is_refused_for_the_cpu_artifact(checkpoints, tmp_path, capsys):
    rc = main(
        [
            "--model_dir",
            str(checkpoints[("llama", False)]),
            "--output_dir",
            str(tmp_path / "o"),
            "--backend",
            "onnxruntime",
            "--dtype",
            "bfloat16",
        ]
    )
    assert rc == 2
    assert "bfloat16 cannot be served by ONNX Runtime" in capsys.readouterr().err


def test_missing_tensorrt_is_reported_before_the_export(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(EngineBuildError, match="tensorrt_rtx"):
        run_vision_build(
            _args(model_dir=checkpoints[("llama", False)], output_dir=tmp_path / "o", backend="tensorrt", quiet=True)
        )
    assert not (tmp_path / "o" / "onnx").exists()


def test_loading_a_folder_that_is_not_a_vision_artifact(tmp_path):
    from mgm_runtime.vision_artifact import VisionArtifactError

    with pytest.raises(VisionArtifactError, match="no config.json"):
        load_vision_artifact(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(VisionArtifactError, match="'llava' is not 'mgm'"):
        load_vision_artifact(tmp_path)
    assert issubclass(VisionArtifactError, MGMError)
