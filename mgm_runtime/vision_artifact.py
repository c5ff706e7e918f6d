"""Open a vision artifact folder (`model.onnx` or `model.engine` + `config.json`) for serving."""

from __future__ import annotations

import json
from pathlib import Path

from mgm_ref.errors import MGMError

MODEL_TYPE = "mgm"
CONFIG_FILE = "config.json"


class VisionArtifactError(MGMError):
    """A folder is not a vision artifact this runtime can open."""


def load_vision_artifact(artifact_dir: str | Path, threads: int | None = None):
    """(config dict, runner) for a folder written by `mgm-build vision`; runner(images=..., images_aux=...)
    returns {"image_features": array}. On CPU, `runtime` says what runs `file`: ONNX Runtime (float32, int8)
    or PyTorch (a torch.export program, bfloat16); on a GPU, a TensorRT engine."""
    folder = Path(artifact_dir)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise VisionArtifactError(f"{folder}: no {CONFIG_FILE}; build it with `mgm-build vision`")
    config = json.loads(cfg_path.read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise VisionArtifactError(f"{cfg_path}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
    if config["backend"] == "onnxruntime":  # the CPU artifact
        runtime = config.get("runtime", "onnxruntime")  # artifacts written before precision modes lack it
        if runtime == "torch":
            from mgm_runtime.torch_runner import TorchProgramRunner

            return config, TorchProgramRunner(folder / config["file"], threads=threads)
        if runtime != "onnxruntime":
            raise VisionArtifactError(f"{cfg_path}: runtime {runtime!r} is not onnxruntime or torch")
        from mgm_runtime.ort_runner import OrtRunner

        return config, OrtRunner(folder / config["file"], threads=threads)
    from mgm_runtime.trt_runner import TrtRunner

    return config, TrtRunner(folder / config["file"], backend=config["backend"])
