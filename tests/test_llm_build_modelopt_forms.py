"""quantize.py against both ModelOpt config forms, for real: 0.37 (what TensorRT-LLM 1.2.1 pins, so what
the 26.07 image has: dict-form `quant_cfg`) in its own venv, and the 0.47 of our venv (list form).

The 0.37 venv lives in work_dirs/ (cached across runs): it has only nvidia-modelopt 0.37.0 and torchprofile
(both --no-deps) and sees our venv's packages through a .pth, so torch, transformers, numpy are ours.
Each version builds fp8, int4_awq, int8_sq and an fp8 KV cache on one tiny checkpoint in one process;
the exported checkpoints must agree within the formats' rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")

from build_engines import trtllm_checkpoint as C

ROOT = Path(__file__).resolve().parent.parent
OLD_MODELOPT = "0.37.0"
VENV = ROOT / "work_dirs" / f"modelopt-{OLD_MODELOPT}-venv"
# (qformat, kv_cache_dtype)
BUILDS = [("fp8", None), ("int4_awq", None), ("int8_sq", None), ("full_prec", "fp8")]
# Registry answers that mean "cannot install here", not "our code is wrong"
REFUSED = (
    "No matching distribution",
    "Could not find a version",
    "ConnectionError",
    "Network is unreachable",
    "Failed to establish a new connection",
    "403",
    "404 Client Error",
    "ProxyError",
)

pytestmark = pytest.mark.slow  # model builds and exports: seconds each (left out of `make test-fast`)

RUNNER = r"""
import argparse, json, sys, time
import modelopt
from build_engines import llm as L

model_dir, out = sys.argv[1], sys.argv[2]
done = {"modelopt": modelopt.__version__, "builds": {}}
for spec in json.loads(sys.argv[3]):
    qformat, kv = spec
    name = qformat + ("-kv" + kv if kv else "")
    extra = ["--kv_cache_dtype", kv] if kv else []
    args = L.add_llm_arguments(argparse.ArgumentParser()).parse_args(
        ["--model_dir", model_dir, "--output_dir", f"{out}/{name}", "--qformat", qformat, *extra,
         "--calib_images", "off", "--calib_size", "4", "--calib_max_len", "48", "--seed", "0"])
    start = time.perf_counter()
    L.run_llm_build(args, log=lambda m: None)
    done["builds"][name] = round(time.perf_counter() - start, 2)
print("RESULT " + json.dumps(done))
"""


def modelopt_037_python() -> Path:
    """The venv's python, created once (a few seconds, two wheels)."""
    python = VENV / "bin" / "python"
    marker = VENV / "installed.json"
    if marker.is_file() and python.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(VENV)], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # our packages (torch, transformers, the project itself) after the venv's own modelopt
    Path(purelib, "zz_mgm_deploy_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            purelib,
            "-c",
            str(ROOT / "constraints-cpu.txt"),
            f"nvidia-modelopt=={OLD_MODELOPT}",
            "torchprofile",
        ],
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0:
        text = pip.stdout + pip.stderr
        if any(r in text for r in REFUSED):
            pytest.skip(f"the registry refused nvidia-modelopt=={OLD_MODELOPT}: {text.strip().splitlines()[-1]}")
        raise RuntimeError(f"pip install nvidia-modelopt=={OLD_MODELOPT} failed:\n{text}")
    marker.write_text(json.dumps({"nvidia-modelopt": OLD_MODELOPT}))
    return python


def run_builds(python: Path, model_dir: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(python), "-c", RUNNER, str(model_dir), str(out), json.dumps(BUILDS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def both_versions(tiny_checkpoints, tmp_path_factory):
    ckpt = tiny_checkpoints("llama")
    out = tmp_path_factory.mktemp("modelopt-forms")
    old = run_builds(modelopt_037_python(), ckpt, out / "old")
    new = run_builds(Path(sys.executable), ckpt, out / "new")
    assert old["modelopt"] == OLD_MODELOPT and new["modelopt"] != OLD_MODELOPT
    print(f"\nbuild seconds: modelopt {old['modelopt']} {old['builds']}; {new['modelopt']} {new['builds']}")
    return out / "old", out / "new"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# dequantized weights: one quantization step of the format at most, on average over the tensor
WEIGHT_TOL = {"fp8": 2e-2, "int4_awq": 5e-2, "int8_sq": 1e-2, "full_prec-kvfp8": 0.0}


@pytest.mark.parametrize("name", ["fp8", "int4_awq", "int8_sq", "full_prec-kvfp8"])
def test_both_modelopt_forms_export_the_same_checkpoint(both_versions, name):
    old_dir, new_dir = (d / name / "checkpoint" for d in both_versions)
    old_cfg, new_cfg = C.read_config(old_dir), C.read_config(new_dir)
    assert old_cfg["quantization"] == new_cfg["quantization"]
    old_raw, new_raw = C.load_ranks(old_dir)[0], C.load_ranks(new_dir)[0]
    assert old_raw.keys() == new_raw.keys()
    for key in new_raw:
        assert old_raw[key].dtype == new_raw[key].dtype and old_raw[key].shape == new_raw[key].shape, key
        if "scaling_factor" in key or "scale" in key:  # calibrated scales: same data, same max/AWQ search
            assert rel(old_raw[key].float(), new_raw[key].float()) < 1e-2, key
    _, old_w = C.load_merged(old_dir)
    _, new_w = C.load_merged(new_dir)
    worst = max((rel(old_w[k].float(), new_w[k].float()), k) for k in new_w if new_w[k].is_floating_point())
    print(f"\n{name}: worst dequantized-weight rel L2 between ModelOpt versions {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= WEIGHT_TOL[name], worst
    if name.endswith("kvfp8"):
        assert new_cfg["quantization"]["kv_cache_quant_algo"] == "FP8"
        assert any("kv_cache_scaling_factor" in k for k in new_raw)
