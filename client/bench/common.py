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
