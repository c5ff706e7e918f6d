"""The one-command check for a first GPU host: `python -m client.gpu_selftest [--work_dir DIR]`.

Inside nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 on a GPU, on a tiny random checkpoint: build the
fp16 vision engine and an fp16 LLM engine (2 images per request), fill the GPU repository, start the server,
send a text-only, a one-image and a two-image request through `ensemble` and `mgm_bls`, compare each answer
with mgm_ref's greedy answer (the prefix before the reference's first top-1/top-2 logit margin below fp16
noise), print a pass/fail table and exit 1 on any failure.

Where TensorRT, TensorRT-LLM, the tensorrtllm backend or a GPU is missing it prints what is missing and exits
2 before building anything (no traceback). It lives in client/ because it drives every layer below.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mgm_ref.errors import MGMError

IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
DEFAULT_BACKEND_DIR = Path("/opt/tritonserver/backends")
MARGIN = 0.05  # logits closer than this at a step: fp16 may legitimately pick the other token
MAX_TOKENS = 12


class SelftestError(MGMError):
    """The host cannot run the selftest; the message says what is missing and where to run it."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _module(name: str) -> tuple[bool, str]:
    if importlib.util.find_spec(name) is None:
        return False, f"python module {name!r} not importable"
    try:
        version = getattr(__import__(name), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - a broken install is reported as such, with its error
        return False, f"import {name} failed: {type(e).__name__}: {e}"
    return True, f"{name} {version}"


def preflight(backend_dir: Path = DEFAULT_BACKEND_DIR) -> list[Check]:
    """What the GPU path needs on this host, each probed without building anything."""
    checks = []
    try:
        import torch

        gpu = torch.cuda.is_available()
        checks.append(Check("CUDA GPU", gpu, torch.cuda.get_device_name(0) if gpu else "torch sees no CUDA GPU"))
    except ImportError:
        checks.append(Check("CUDA GPU", False, "torch is not installed"))
    checks.append(Check("TensorRT", *_module("tensorrt")))
    checks.append(Check("TensorRT-LLM", *_module("tensorrt_llm")))
    from build_engines.trtllm import find_trtllm_build

    exe = find_trtllm_build()
    checks.append(Check("trtllm-build", exe is not None, exe or "not on PATH"))
    server = shutil.which("tritonserver")
    checks.append(Check("tritonserver", server is not None, server or "not on PATH"))
    lib = backend_dir / "tensorrtllm" / "libtriton_tensorrtllm.so"
    checks.append(Check("tensorrtllm backend", lib.is_file(), str(lib) if lib.is_file() else f"no {lib}"))
    return checks


def table(rows: list[tuple[str, bool, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {'PASS' if ok else 'FAIL'}  {detail}" for name, ok, detail in rows)


def require(checks: list[Check]) -> None:
    missing = [c for c in checks if not c.ok]
    if missing:
        raise SelftestError(
            "cannot run the GPU selftest here; missing: "
            + "; ".join(f"{c.name} ({c.detail})" for c in missing)
            + f". Run it on a GPU host inside {IMAGE}: docker run --rm --gpus all mgm-deploy "
            "python -m client.gpu_selftest"
        )


def reference_prefix(ref, prompt: str, images: list[bytes]) -> list[int]:
    """mgm_ref's greedy tokens up to (not including) the first step whose top-1/top-2 margin < MARGIN."""
    import torch

    from mgm_ref.conversation import build_prompt
    from mgm_ref.preprocess import load_image

    pils = [load_image(b) for b in images]
    feats = ref.image_features(pils) if pils else None
    ids = ref.tokenize(build_prompt(ref.conv_mode, prompt, len(pils)))
    out, stops = [], set(ref.stop_token_ids())
    for _ in range(MAX_TOKENS):
        logits = ref.logits([ids + out], feats)[0, -1].float()
        top = torch.topk(logits, 2)
        if float(top.values[0] - top.values[1]) < MARGIN:
            break
        token = int(top.indices[0])
        if token in stops:
            break
        out.append(token)
    return out


def requests(images: list[bytes]) -> list[tuple[str, list[bytes]]]:
    return [("text only", []), ("one image", images[:1]), ("two images", images[:2])]


def synthetic_pngs(n: int) -> list[bytes]:
    import io

    from mgm_ref.tiny import synthetic_scene

    out = []
    for seed in range(n):
        buf = io.BytesIO()
        synthetic_scene(320, 240, seed, noise=24).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def full_run(work: Path, backend_dir: Path) -> int:
    checks = preflight(backend_dir)
    print("preflight:\n" + table([(c.name, c.ok, c.detail) for c in checks]))
    require(checks)

    from build_engines.cli import main as build
    from client.mgm_client import MGMClient
    from mgm_ref.loader import load_model
    from mgm_ref.tiny import write_tiny_checkpoint
    from triton_models.server import TritonServer

    ckpt = write_tiny_checkpoint(work / "checkpoint", "llama", seed=0)
    engines, repo = work / "engines", work / "repo"
    steps = [
        [
            "vision",
            "--model_dir",
            str(ckpt),
            "--output_dir",
            str(engines / "vision"),
            "--dtype",
            "float16",
            "--backend",
            "tensorrt",
        ],
        [
            "llm",
            "--model_dir",
            str(ckpt),
            "--output_dir",
            str(engines / "llm"),
            "--dtype",
            "float16",
            "--max_batch_size",
            "4",
            "--max_images_per_request",
            "2",
            "--build",
        ],
        ["repo", "--model_dir", str(ckpt), "--engine_dir", str(engines), "--output_dir", str(repo), "--backend", "gpu"],
    ]
    for argv in steps:
        print(f"mgm-build {' '.join(argv)}")
        if build(argv) != 0:
            print(f"selftest: FAIL at mgm-build {argv[0]}")
            return 1
    ref = load_model(ckpt)
    rows: list[tuple[str, bool, str]] = []
    server = TritonServer(repo).start(timeout=600)
    try:
        for model in ("ensemble", "mgm_bls"):
            client = MGMClient(server.grpc_url, protocol="grpc", model=model, timeout_s=300)
            for name, images in requests(synthetic_pngs(2)):
                prompt = "What is in the picture?" if images else "Say something."
                want = reference_prefix(ref, prompt, images)
                try:
                    answer = client.generate(prompt, images, max_tokens=MAX_TOKENS, temperature=0.0)
                    want_text = ref.decode(want).strip()
                    ok = answer.text.strip().startswith(want_text)
                    rows.append(
                        (
                            f"{model} / {name}",
                            ok,
                            f"reference {want_text!r} ({len(want)} tokens above the margin); got {answer.text!r}",
                        )
                    )
                except Exception as e:  # noqa: BLE001 - every request is one row of the table
                    rows.append((f"{model} / {name}", False, f"{type(e).__name__}: {e}"))
    finally:
        server.stop()
    print("selftest:\n" + table(rows))
    return 0 if all(ok for _, ok, _ in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.gpu_selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=None, help="where engines and the repository go (default: temp)")
    parser.add_argument("--backend_dir", default=str(DEFAULT_BACKEND_DIR), help="Triton's backends folder")
    args = parser.parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mgm-selftest-"))
    try:
        return full_run(work, Path(args.backend_dir))
    except SelftestError as e:
        print(f"selftest: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
