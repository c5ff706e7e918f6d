"""The CPU model repository for a checkpoint, ready for tritonserver (demo, mgm-bench, tests).

    model_dir, repo = prepare_cpu_repo(None, Path("work_dirs/demo"))   # the built-in tiny checkpoint

Needs both builder and serving sides (`mgm-build vision`, `mgm-build repo`), hence lives in the client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

TINY_NAME = "tiny-mgm-llama"


def tiny_checkpoint(work: Path, log: Callable[[str], None] = print) -> Path:
    """The built-in tiny llama checkpoint under `work` (written on first use)."""
    from mgm_ref.tiny import write_tiny_checkpoint

    model_dir = work / TINY_NAME
    if not (model_dir / "config.json").is_file():
        log(f"writing the built-in tiny llama checkpoint to {model_dir}")
        write_tiny_checkpoint(model_dir, "llama")
    return model_dir


def prepare_cpu_repo(
    model_dir: Path | None,
    work: Path,
    max_batch_size: int = 8,
    log: Callable[[str], None] = print,
    verify: bool = False,
) -> tuple[Path, Path]:
    """(checkpoint, model repository) under `work`; `model_dir` None: the built-in tiny checkpoint.

    The vision artifact (ONNX Runtime, float32) is built once per checkpoint folder and reused; the
    repository is rewritten every time (it is small and records the batch size). `verify`: check the
    new vision artifact against PyTorch (rel L2) as `mgm-build vision` does.
    """
    from build_engines.vision import build_vision
    from mgm_ref.config import MGMConfig
    from mgm_ref.loader import load_vision
    from triton_models.repo_builder import build_repo

    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir) if model_dir is not None else tiny_checkpoint(work, log)
    tag = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:8]  # same name, other folder: rebuild
    engines = work / "engines" / f"{model_dir.name}-{tag}"
    if not (engines / "vision" / "config.json").is_file():
        log("building the vision artifact (ONNX Runtime, float32)")
        cfg = MGMConfig.from_model_dir(model_dir)
        build_vision(
            load_vision(model_dir, config=cfg),
            cfg,
            engines / "vision",
            dtype="float32",
            backend="onnxruntime",
            max_batch_size=4,
            verify=verify,
            log=log if verify else lambda m: None,
        )
    repo = build_repo(model_dir, engines, work / "repo", backend="cpu", max_batch_size=max_batch_size)
    return model_dir, repo
