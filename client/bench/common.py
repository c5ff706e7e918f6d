"""What every mgm-bench module shares: the error type, the progress line, the default work folder."""

from __future__ import annotations

import os
from pathlib import Path

from mgm_ref.errors import MGMError

DEFAULT_WORK = Path(os.environ.get("MGM_WORK_DIR", "work_dirs/bench"))


class BenchError(MGMError, RuntimeError):
    """A benchmark run failed or gave no usable numbers."""


def log(message: str) -> None:
    print(f"[mgm-bench] {message}", flush=True)


def tiny_checkpoint_with_vision(work: Path, llm: str = "llama", vision: str = "tiny", max_batch_size: int = 1) -> Path:
    """A random tiny checkpoint in `work/ckpt` and its ONNX Runtime vision artifact in `work/engines/vision`
    (`vision="real"`: MGM-7B's towers in front of the tiny LLM)."""
    from build_engines.vision import build_vision
    from mgm_ref.loader import load_model
    from mgm_ref.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(work / "ckpt", llm, False, seed=0, vision=vision)
    ref = load_model(ckpt)
    build_vision(
        ref.vision,
        ref.config,
        work / "engines" / "vision",
        dtype="float32",
        backend="onnxruntime",
        max_batch_size=max_batch_size,
        verify=False,
        log=lambda m: None,
    )
    return ckpt
