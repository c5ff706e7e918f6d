"""Run Triton's perf_analyzer from the tritonclient wheel and read its results.

The wheel's `bin/perf_analyzer` (tritonclient 2.51.0; later wheels need glibc 2.38) links against
`libb64.so.0d` and `libcudart.so.12`, which the wheel does not ship. nvidia-pytriton bundles
both under hashed names, so we expose them under their sonames in a private directory.

    result = run_perf_analyzer(["-m", "add_one", "-u", server.http_url, "--shape", "INPUT0:4"])
    rows = parse_summary(result.stdout)   # [(concurrency, infer/s, avg latency us), ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Sequence
from ctypes.util import find_library
from pathlib import Path

from mgm_ref.errors import MGMError
from triton_models.server import bundled_libs_dir, cache_root

# soname -> the name find_library() knows it by
NEEDED_LIBS = {"libb64.so.0d": "b64", "libcudart.so.12": "cudart"}


class PerfAnalyzerError(MGMError, RuntimeError):
    """perf_analyzer is missing, cannot be made runnable, or failed."""


def find_perf_analyzer() -> Path:
    """The venv's perf_analyzer (from the tritonclient wheel), else one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "perf_analyzer"]
    on_path = shutil.which("perf_analyzer")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise PerfAnalyzerError(
        "perf_analyzer not found: `pip install tritonclient[all]==2.51.0` ships it in the venv's "
        "bin/ (newer wheels need glibc >= 2.38), or use the NGC tritonserver *-py3-sdk image"
    )


def _bundled_lib(libs_dir: Path, soname: str) -> Path | None:
    """nvidia-pytriton's copy of `soname` (auditwheel renamed libb64.so.0d libb64-<hash>.so.0d)."""
    stem, _, version = soname.partition(".so")
    matches = sorted(libs_dir.glob(f"{stem}-*.so{version}*"))
    return matches[0] if matches else None


def _link(target: Path, link: Path) -> None:
    # Create-then-rename, so concurrent callers never see a missing or half-made link.
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def perf_analyzer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which perf_analyzer finds libb64.so.0d and libcudart.so.12."""
    env = dict(os.environ if base is None else base)
    libs_dir = bundled_libs_dir()
    # One link dir per nvidia-pytriton install: links point into that venv.
    key = hashlib.sha1(str(libs_dir).encode()).hexdigest()[:10]
    shim = cache_root() / f"perf-analyzer-libs-{key}"
    missing = []
    for soname, short in NEEDED_LIBS.items():
        bundled = _bundled_lib(libs_dir, soname) if libs_dir and libs_dir.is_dir() else None
        if bundled is not None:
            shim.mkdir(parents=True, exist_ok=True)
            _link(bundled, shim / soname)
        elif find_library(short) is None:
            missing.append(soname)
    if missing:
        raise PerfAnalyzerError(
            f"perf_analyzer needs {missing}: `pip install nvidia-pytriton==0.7.0` (bundles them), "
            "or `apt-get install libb64-0d` and `pip install nvidia-cuda-runtime-cu12`"
        )
    if shim.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(shim), env.get("LD_LIBRARY_PATH")) if p)
    return env


def run_perf_analyzer(args: Sequence[str], timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run perf_analyzer with `args`; PerfAnalyzerError with its output when it fails."""
    cmd = [str(find_perf_analyzer()), *args]
    try:
        result = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # seen once: it wrote its results, then did not exit
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        result = subprocess.CompletedProcess(cmd, 124, out, err + f"\nperf_analyzer timed out after {timeout:.0f} s")
    if check and result.returncode != 0:
        raise PerfAnalyzerError(
            f"{' '.join(cmd)} exited with {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@dataclasses.dataclass(frozen=True)
class PerfRow:
    concurrency: int
    throughput: float  # inferences per second
    latency_us: float  # average client latency (for --streaming: the whole stream)


_SUMMARY = re.compile(
    r"Concurrency:\s*(\d+),\s*throughput:\s*([\d.eE+-]+)\s*infer/sec,"
    r"\s*latency\s*([\d.eE+-]+)\s*usec"
)


def parse_summary(stdout: str) -> list[PerfRow]:
    """The closing `Concurrency: N, throughput: X infer/sec, latency Y usec` lines."""
    rows = [PerfRow(int(c), float(t), float(lat)) for c, t, lat in _SUMMARY.findall(stdout)]
    if not rows:
        raise PerfAnalyzerError(f"no throughput summary in perf_analyzer output:\n{stdout[-2000:]}")
    return rows
