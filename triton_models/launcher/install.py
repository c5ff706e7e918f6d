"""Finding a runnable tritonserver: the one on PATH (NGC image) or the nvidia-pytriton wheel's.

The wheel's binary only runs from a writable copy of its tree with the right libraries on
LD_LIBRARY_PATH, which `wheel_server()` prepares once per cache directory.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from triton_models.launcher.errors import ServerError

_TREE_STAMP = ".mgm-complete"


@dataclasses.dataclass(frozen=True)
class ServerInstall:
    """A runnable tritonserver: the binary, where its backends live and the env it needs."""

    binary: Path
    backend_dir: Path | None = None  # None: the server's built-in default (/opt/tritonserver/...)
    cache_dir: Path | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # overrides for os.environ
    flags: frozenset[str] = frozenset()  # the `--options` its --help lists (newer servers grow some)


def cache_root() -> Path:
    """Where mgm-deploy keeps generated, reusable files (server tree, perf_analyzer libs)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mgm-deploy"


def pytriton_root() -> Path:
    """`site-packages/pytriton` of the running interpreter; ServerError when not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServerError(
            "no `tritonserver` on PATH and the nvidia-pytriton wheel is not installed: "
            "run inside the NGC tritonserver image or `pip install 'mgm-deploy[serve]'`"
        )
    return Path(spec.origin).parent


def pytriton_libs_dir() -> Path:
    """The wheel's bundled shared libraries (libtritonserver, libb64, libcudart, ...)."""
    return pytriton_root().parent / "nvidia_pytriton.libs"


def default_server_home() -> Path:
    """`$MGM_TRITON_HOME`, or a per-version, per-Python-minor directory in the cache."""
    if os.environ.get("MGM_TRITON_HOME"):
        return Path(os.environ["MGM_TRITON_HOME"]).expanduser()
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache_root() / f"tritonserver-{version}-py{py}"


def bundled_libs_dir() -> Path | None:
    """The wheel's bundled shared libraries, or None when nvidia-pytriton is not installed
    (perf_analyzer borrows libb64 and libcudart from there)."""
    try:
        return pytriton_libs_dir()
    except ServerError:
        return None


def _populate_tree(src: Path, dest: Path) -> None:
    """Copy the server and the python backend stub that matches this interpreter into `dest`."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (src / "python_backend_stubs").iterdir())
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {py} (it has {have})")
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("bin", "backends", "caches"):
        shutil.copytree(src / name, dest / name, ignore=ignore)
    shutil.copy2(stub, dest / "backends" / "python" / stub.name)


def ensure_server_tree(src: Path, dest: Path) -> Path:
    """Make the writable server tree at `dest` once; safe when several processes race.

    The tree is built in a sibling temp dir and renamed into place, so `dest` is either
    absent or complete; the loser of a race discards its copy.
    """
    if (dest / _TREE_STAMP).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _populate_tree(src, tmp)
        (tmp / _TREE_STAMP).write_text(f"copied from {src}\n")
        try:
            os.rename(tmp, dest)  # atomic; also replaces an empty `dest` directory
        except OSError as exc:
            if not (dest / _TREE_STAMP).is_file():
                raise ServerError(f"cannot create the server tree at {dest}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _prepend_path(value: str | None, *entries: str) -> str:
    return os.pathsep.join([*entries, *([value] if value else [])])


def wheel_server(home: Path | None = None) -> ServerInstall:
    """The nvidia-pytriton server, set up to run from `home` (default: default_server_home())."""
    tree = ensure_server_tree(pytriton_root() / "tritonserver", home or default_server_home())
    # The binary's RPATH only works inside site-packages. Python's LIBDIR goes first so the stub
    # embeds the same libpython as this interpreter rather than the wheel's bundled one.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld_path = _prepend_path(os.environ.get("LD_LIBRARY_PATH"), libdir, str(pytriton_libs_dir()))
    # The stub resolves `python3` on PATH to find its site-packages; put this venv first so
    # model.py sees the same packages (numpy, torch, the project) as this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    path = _prepend_path(os.environ.get("PATH"), bin_dir)
    return ServerInstall(
        binary=tree / "bin" / "tritonserver",
        backend_dir=tree / "backends",
        cache_dir=tree / "caches",
        env={"LD_LIBRARY_PATH": ld_path, "PATH": path},
    )


@functools.cache
def _listed_flags(binary: Path, env: tuple[tuple[str, str], ...]) -> frozenset[str]:
    try:
        out = subprocess.run(
            [str(binary), "--help"], env={**os.environ, **dict(env)}, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"cannot run {binary} --help: {exc}") from exc
    return frozenset(re.findall(r"--[a-z][a-z0-9-]+", out.stdout + out.stderr))


def with_flags(server: ServerInstall) -> ServerInstall:
    """`server` with the options its --help lists (read once per binary)."""
    return dataclasses.replace(server, flags=_listed_flags(server.binary, tuple(sorted(server.env.items()))))


def find_server() -> ServerInstall:
    """`tritonserver` from PATH (NGC image), else the nvidia-pytriton wheel's server."""
    on_path = shutil.which("tritonserver")
    return with_flags(ServerInstall(binary=Path(on_path)) if on_path else wheel_server())
