"""The CPU artifact's precision modes (`mgm-build vision --backend onnxruntime --precision ...`) on tiny
checkpoints: each mode's parity with float32 mgm_ref on fresh inputs, the error recorded in config.json,
the refusal above the limit, the option errors, and the serving side loading what the config says."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from build_engines.vision import (
    OUTPUT_NAME,
    PARITY_SEED,
    VisionBuildError,
    VisionGraphSpec,
    add_vision_arguments,
    main,
    run_vision_build,
)
from build_engines.vision_cpu import MAX_REL_L2, Bfloat16Program, count_quantized
from build_engines.vision_graph import MGMVisionGraph
from mgm_ref.config import MGMConfig
from mgm_ref.loader import load_vision
from mgm_runtime.numerics import rel_l2
from mgm_runtime.torch_runner import ProgramArchiveError, check_program_archive
from mgm_runtime.vision_artifact import VisionArtifactError, load_vision_artifact
from triton_models.lib.vision_runner import VisionRunner

pytestmark = pytest.mark.slow  # exports and quantisation: seconds each (left out of `make test-fast`)

MODELS = [("llama", False), ("gemma", True)]
MODEL_IDS = ["llama-normal", "gemma-hd"]
MODES = ("bfloat16", "int8")


def _args(**kw) -> argparse.Namespace:
    argv = []
    for k, v in kw.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None:
            argv += [f"--{k}", str(v)]
    return add_vision_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    out = {}
    for llm, hd in MODELS:
        d = tiny_checkpoints(llm, hd)
        out[(llm, hd)] = d, MGMConfig.from_model_dir(d), load_vision(d, torch.float32)
    return out


@pytest.fixture(scope="module")
def artifacts(references, tmp_path_factory):
    """(llm, hd, precision) -> (folder, config) built through the CLI entry point (lazily)."""
    root = tmp_path_factory.mktemp("precision")
    cache = {}

    def get(llm, hd, precision):
        key = (llm, hd, precision)
        if key not in cache:
            out = root / f"{llm}-{hd}-{precision}"
            config = run_vision_build(
                _args(
                    model_dir=references[(llm, hd)][0],
                    output_dir=out,
                    backend="onnxruntime",
                    precision=precision,
                    max_batch_size=4,
                    quiet=True,
                )
            )
            cache[key] = out, config
        return cache[key]

    return get


def _fresh(cfg, batch, seed):
    return VisionGraphSpec.from_config(cfg).dummy_inputs(batch, torch.float32, seed=seed)


@pytest.mark.parametrize("precision", MODES)
@pytest.mark.parametrize("llm,hd", MODELS, ids=MODEL_IDS)
def test_mode_matches_fp32_mgm_ref_within_its_limit(artifacts, references, llm, hd, precision):
    _, cfg, ref = references[(llm, hd)]
    folder, _ = artifacts(llm, hd, precision)
    config, runner = load_vision_artifact(folder, threads=2)
    images, images_aux = _fresh(cfg, 3, seed=300)
    with torch.no_grad():
        want = ref(images, images_aux)
    got = runner(images=images.numpy(), images_aux=images_aux.numpy())[OUTPUT_NAME]
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    err = rel_l2(got, want)
    print(f"PARITY {precision} vs fp32 mgm_ref, {llm} {'HD' if hd else 'normal'} batch 3: rel L2 {err:.2e}")
    assert err <= MAX_REL_L2[precision]
    # a reduced precision really runs: the float32 graph gives ~1e-7 here
    assert err > 1e-4


@pytest.mark.parametrize("precision", MODES)
def test_config_records_the_mode_and_its_measured_error(artifacts, references, precision):
    _, cfg, ref = references[("llama", False)]
    folder, returned = artifacts("llama", False, precision)
    config = json.loads((folder / "config.json").read_text())
    assert config == returned
    assert config["precision"] == config["builder_config"]["precision"] == precision
    assert config["backend"] == "onnxruntime" and config["dtype"] == "float32"
    assert [i["dtype"] for i in config["inputs"]] == ["float32", "float32"]
    assert config["runtime"] == {"bfloat16": "torch", "int8": "onnxruntime"}[precision]
    assert config["file"] == {"bfloat16": "model.pt2", "int8": "model.onnx"}[precision]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", config["file"]])
    parity = config["parity"]
    assert parity["max_rel_l2"] == MAX_REL_L2[precision]
    # the recorded error is the one these inputs give now (not a constant, not the export's inputs)
    images, images_aux = _fresh(cfg, 1, seed=PARITY_SEED)
    with torch.no_grad():
        want = ref(images, images_aux)
    _, runner = load_vision_artifact(folder, threads=2)
    again = rel_l2(runner(images=images.numpy(), images_aux=images_aux.numpy())[OUTPUT_NAME], want)
    assert parity["rel_l2_vs_pytorch_fp32"] == pytest.approx(again, rel=1e-3)
    assert 1e-4 < parity["rel_l2_vs_pytorch_fp32"] <= parity["max_rel_l2"]


def test_int8_quantises_the_weight_matmuls_only(artifacts):
    folder, config = artifacts("llama", False, "int8")
    counts = count_quantized(folder / "model.onnx")
    assert counts == config["quantized"]
    assert counts["MatMulInteger"] > 0
    # attention's two activation products per CLIP layer stay float (MatMulConstBOnly)
    assert counts["MatMul"] > 0


def test_served_through_the_vision_runner_in_chunks(artifacts, references):
    """The serving library's runner (max_batch_size chunks) over the torch program."""
    _, cfg, ref = references[("llama", False)]
    folder, _ = artifacts("llama", False, "bfloat16")
    images, images_aux = _fresh(cfg, 5, seed=301)  # 5 > max_batch_size 4: two calls
    got = VisionRunner.from_dir(folder, threads=2)(images.numpy(), images_aux.numpy())
    with torch.no_grad():
        want = ref(images, images_aux)
    assert got.shape == tuple(want.shape)
    assert rel_l2(got, want) <= MAX_REL_L2["bfloat16"]


@pytest.mark.parametrize("precision", MODES)
def test_mode_above_a_forced_limit_is_refused(references, tmp_path, capsys, precision):
    d = references[("llama", False)][0]
    out = tmp_path / precision
    argv = ["--model_dir", str(d), "--output_dir", str(out), "--backend", "onnxruntime"]
    argv += ["--precision", precision, "--max_rel_l2", "1e-6", "--quiet"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert f"--precision {precision} is refused" in err and "above the limit 1e-06" in err
    assert not (out / "config.json").exists()
    with pytest.raises(VisionArtifactError):
        load_vision_artifact(out)


def test_refused_rebuild_leaves_no_older_artifact_loadable(artifacts, references, tmp_path):
    d = references[("llama", False)][0]
    out = tmp_path / "again"
    common = dict(model_dir=d, output_dir=out, backend="onnxruntime", precision="int8", quiet=True)
    run_vision_build(_args(**common))
    assert (out / "config.json").is_file()
    with pytest.raises(VisionBuildError, match="refused"):
        run_vision_build(_args(**common, max_rel_l2="1e-6"))
    assert not (out / "config.json").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--backend", "tensorrt_rtx", "--precision", "int8"], "--precision is for the CPU artifact"),
        (["--backend", "onnxruntime", "--dtype", "float16", "--precision", "bf16"], "starts from the float32 graph"),
        (["--backend", "onnxruntime", "--precision", "int8", "--no_verify"], "always checked against float32"),
    ],
)
def test_option_errors(references, tmp_path, capsys, extra, message):
    d = references[("llama", False)][0]
    assert main(["--model_dir", str(d), "--output_dir", str(tmp_path / "o"), "--quiet", *extra]) != 0
    assert message in capsys.readouterr().err


def test_precision_aliases_and_choices():
    assert _args(model_dir="m", output_dir="o", precision="bf16").precision == "bfloat16"
    assert _args(model_dir="m", output_dir="o", precision="fp32").precision == "float32"
    assert _args(model_dir="m", output_dir="o").precision is None
    with pytest.raises(SystemExit):
        _args(model_dir="m", output_dir="o", precision="fp8")


def test_fp32_parity_records_its_limit(references, tmp_path):
    d = references[("llama", False)][0]
    config = run_vision_build(
        _args(model_dir=d, output_dir=tmp_path, backend="onnxruntime", precision="fp32", quiet=True)
    )
    assert config["precision"] == "float32" and config["runtime"] == "onnxruntime"
    assert config["parity"]["onnxruntime_vs_pytorch_fp32_rel_l2"] <= config["parity"]["max_rel_l2"] == 1e-4


def test_unknown_runtime_is_refused(artifacts, tmp_path):
    folder, config = artifacts("llama", False, "int8")
    (tmp_path / "config.json").write_text(json.dumps({**config, "runtime": "tvm"}))
    with pytest.raises(VisionArtifactError, match="runtime 'tvm'"):
        load_vision_artifact(tmp_path)


def test_program_archive_with_pickled_sample_inputs_is_refused(references, tmp_path):
    """torch.export.save keeps sample inputs as a torch.save pickle unless they are dropped, as the
    build does; the runner refuses an archive that would be unpickled."""
    _, cfg, ref = references[("llama", False)]
    program = torch.export.export(Bfloat16Program(MGMVisionGraph(ref)).eval(), _fresh(cfg, 1, 0))
    path = tmp_path / "with-inputs.pt2"
    torch.export.save(program, path)
    with pytest.raises(ProgramArchiveError, match="sample inputs"):
        check_program_archive(path)
    (tmp_path / "not-a-zip.pt2").write_bytes(b"junk")
    with pytest.raises(ProgramArchiveError, match="not a torch.export archive"):
        check_program_archive(tmp_path / "not-a-zip.pt2")
