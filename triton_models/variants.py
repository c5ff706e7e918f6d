"""Several MGM variants in one model repository, and the OpenAI front door beside tritonserver.

`mgm-build repo --name mgm-7b` deploys a checkpoint's models as `mgm-7b_preprocessing`, ...,
`mgm-7b_mgm_bls` (the BLS finds its siblings by its own name's prefix), next to the variants
already in the repository. Clients pick a variant by that prefix (the OpenAI `model` field).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mgm_ref.errors import MGMError
from triton_models.launcher.argv import ADMIN_KEY_ENV

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
# Lines of config.pbtxt that name a model: its own top-level `name:` (unindented, unlike tensor
# names in input/output blocks) and an ensemble step's `model_name:`.
_MODEL_REFS = re.compile(r'^(name:\s*"|\s*model_name:\s*")([^"]+)(")', re.MULTILINE)
BLS = "mgm_bls"


def check_variant_name(name: str) -> str:
    # No "_": the served name is everything before the last "_mgm_bls", so it must not be ambiguous.
    if not _NAME.match(name):
        raise MGMError(f"--name {name!r}: use letters, digits, '.' and '-' (starting with a letter or digit)")
    return name


def add_named_variant(build, out: Path, name: str) -> Path:
    """Run `build(tmp_dir)` (which writes a whole repository), then move its models into `out` as `name_*`.

    Models of other variants in `out` are left alone; an earlier copy of this variant is replaced.
    """
    check_variant_name(name)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out.parent) as tmp:
        built = Path(build(Path(tmp) / "repo"))
        for model in sorted(p for p in built.iterdir() if p.is_dir()):
            config = model / "config.pbtxt"
            config.write_text(_MODEL_REFS.sub(lambda m: f"{m[1]}{name}_{m[2]}{m[3]}", config.read_text()))
            dest = out / f"{name}_{model.name}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.move(str(model), dest)
    return out


def variant_names(repo: Path) -> list[str]:
    """Served names of the variants in a repository: "" for an unprefixed mgm_bls, else the prefix."""
    return sorted(
        p.name.removesuffix(BLS).removesuffix("_") for p in Path(repo).iterdir() if p.is_dir() and p.name.endswith(BLS)
    )


def tolerant_server_args(repo: Path) -> tuple[str, ...]:
    """With several variants, one that fails to load must not take the others down with it."""
    if Path(repo).is_dir() and len(variant_names(repo)) > 1:
        return ("--exit-on-error=false", "--strict-readiness=false")
    return ()


def start_openai_server(
    grpc_url: str, port: int, host: str, extra: list[str] | None = None, admin_key: str | None = None
) -> subprocess.Popen:
    """The OpenAI-compatible server as a child process (by module name: triton_models never imports client).

    `admin_key` lets it list the repository's models (a restricted API) to find the variants."""
    cmd = [
        sys.executable,
        "-m",
        "client.openai_api",
        "--triton_url",
        grpc_url,
        "--port",
        str(port),
        "--host",
        host,
        *(extra or []),
    ]
    env = {**os.environ, ADMIN_KEY_ENV: admin_key} if admin_key else None
    return subprocess.Popen(cmd, env=env)


def add_openai_arguments(parser) -> None:
    parser.add_argument(
        "--openai_port", type=int, default=None, help="also serve the OpenAI-compatible API (mgm-openai) on this port"
    )
    parser.add_argument(
        "--openai_args", default="", help='more mgm-openai options, e.g. "--allowed_local_media_path /data/images"'
    )


@contextlib.contextmanager
def openai_sidecar(args, grpc_url: str, admin_key: str | None = None):
    """Run mgm-openai beside a ready tritonserver while the block runs (when --openai_port is set)."""
    if not args.openai_port:
        yield None
        return
    proc = start_openai_server(grpc_url, args.openai_port, args.host, shlex.split(args.openai_args), admin_key)
    print(f"mgm-serve: OpenAI API on http://{args.host}:{args.openai_port}/v1", file=sys.stderr, flush=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
