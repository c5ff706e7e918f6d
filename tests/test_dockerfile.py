"""The GPU image carries every package of the project and what `mgm-build vision` imports."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_image_copies_every_project_package():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = set(re.findall(r"^COPY (\S+) \1$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert packages <= copied, f"Dockerfile does not COPY {sorted(packages - copied)}"


def test_image_installs_onnxruntime_for_the_vision_parity_check():
    # build_engines' ONNX parity check runs onnxruntime; the TensorRT-LLM image does not ship it.
    assert re.search(r'pip install[^\n]*"onnxruntime', (ROOT / "Dockerfile").read_text())
