"""The `trtllm-build` step for MGM's language model (TensorRT-LLM 1.2.1, legacy TensorRT-engine flow).

`trtllm_build_argv` returns the exact command line for one exported checkpoint; `run_trtllm_build` runs it
when the tool is installed (TensorRT-LLM only installs inside NVIDIA's container on a GPU host) and otherwise
fails with a message naming the image to run it in.

Multimodal contract (TensorRT-LLM `PromptTuningEmbedding`): image rows are fed as a prompt table and addressed
by fake token ids `vocab_size, vocab_size + 1, ...` (vocab_size of the exported checkpoint). The engine must
be built with `--max_multimodal_len` = max_batch_size x image tokens per request (576 per image, 2880 for HD),
and `--max_input_len` counts those image tokens, because every image row is one input position.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mgm_ref.errors import MGMError
from mgm_runtime.contract import DEFAULT_MAX_NUM_TOKENS, DEFAULT_MAX_OUTPUT_LEN, derive_limits  # noqa: F401

TRTLLM_VERSION = "1.2.1"
# The last NGC Triton image with the TensorRT-engine path: 26.04-26.07 ship TensorRT-LLM 1.2.1 (TensorRT
# 10.14.1.48, Python 3.12); 25.12-26.02 ship 1.1.0; no trtllm image was built for 26.08.
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"


class TrtllmBuildError(MGMError, RuntimeError):
    """trtllm-build is missing, or ran and failed."""


@dataclass(frozen=True)
class EngineLimits:
    """The engine's shape limits, derived and checked once (image tokens included)."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_multimodal_len: int
    max_num_tokens: int
    tokens_per_image: int
    max_images_per_request: int


def max_multimodal_len(max_batch_size: int, tokens_per_image: int, max_images_per_request: int = 1) -> int:
    """Rows of the prompt table the engine must hold: every request of a full batch with all its images."""
    return max_batch_size * tokens_per_image * max_images_per_request


def engine_limits(
    *,
    max_batch_size: int,
    tokens_per_image: int,
    max_input_len: int | None = None,
    max_seq_len: int | None = None,
    max_images_per_request: int = 1,
    default_input_len: int = 2048,
    max_num_tokens: int | None = None,
) -> EngineLimits:
    """Fill defaults and check them with the contract's one formula (mgm-build repo reads the result back)."""
    return EngineLimits(
        **derive_limits(
            max_batch_size=max_batch_size,
            tokens_per_image=tokens_per_image,
            max_input_len=max_input_len,
            max_seq_len=max_seq_len,
            max_images_per_request=max_images_per_request,
            default_input_len=default_input_len,
            max_num_tokens=max_num_tokens,
        )
    )


def gemm_plugin(qformat: str, dtype: str) -> str:
    """FP8 checkpoints take `auto` (TensorRT-LLM's FP8 recipe); the others the activation dtype."""
    return "auto" if qformat == "fp8" else dtype


def trtllm_build_argv(
    checkpoint_dir: str | Path,
    engine_dir: str | Path,
    limits: EngineLimits,
    *,
    dtype: str,
    qformat: str,
    kv_cache_dtype: str | None = None,
    workers: int = 1,
    executable: str = "trtllm-build",
) -> list[str]:
    """The exact `trtllm-build` command for one MGM LLM checkpoint, as an argv list."""
    argv = [
        executable,
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--output_dir",
        str(engine_dir),
        "--max_batch_size",
        str(limits.max_batch_size),
        "--max_input_len",
        str(limits.max_input_len),
        "--max_seq_len",
        str(limits.max_seq_len),
        "--max_num_tokens",
        str(limits.max_num_tokens),
        "--max_multimodal_len",
        str(limits.max_multimodal_len),
        "--gemm_plugin",
        gemm_plugin(qformat, dtype),
        "--gpt_attention_plugin",
        dtype,
        "--kv_cache_type",
        "paged",
        "--remove_input_padding",
        "enable",
        "--context_fmha",
        "enable",
        # paged context FMHA is what KV-cache reuse needs (without it the executor turns reuse off);
        # never --gather_context_logits: context logits switch reuse off too
        "--use_paged_context_fmha",
        "enable",
    ]
    if qformat == "fp8" and kv_cache_dtype == "fp8":
        argv += ["--use_fp8_context_fmha", "enable"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return argv


def format_command(argv: list[str]) -> str:
    """One flag per line, shell-quoted, for build_engine.sh and logs."""
    parts = [shlex.quote(argv[0])]
    i = 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            parts.append(f"{argv[i]} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            parts.append(argv[i])
            i += 1
    return " \\\n    ".join(parts)


def write_build_script(path: str | Path, argv: list[str], image: str | None = None) -> Path:
    path = Path(path)
    image = image or container_image()
    path.write_text(
        "#!/usr/bin/env bash\n"
        f"# Build the TensorRT-LLM engine for this checkpoint. Needs TensorRT-LLM {TRTLLM_VERSION} on a GPU host,\n"
        f"# inside {image} (engines run only with the TensorRT they were built with).\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n' + format_command(argv) + "\n"
    )
    path.chmod(0o755)
    return path


def container_image(repo_root: str | Path | None = None) -> str:
    """The TensorRT-LLM Triton image named by the project's Dockerfile, else the generic NGC name."""
    root = Path(repo_root) if repo_root else Path(__file__).resolve().parent.parent
    for dockerfile in sorted(root.glob("Dockerfile*")) + sorted(root.glob("docker/Dockerfile*")):
        try:
            text = dockerfile.read_text()
        except OSError:
            continue
        args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.MULTILINE))
        for image in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE):
            image = re.sub(r"\$\{?(\w+)\}?", lambda m, known=args: known.get(m.group(1), m.group(0)), image)
            if "trtllm" in image:
                return image
    return DEFAULT_IMAGE


def find_trtllm_build() -> str | None:
    found = shutil.which("trtllm-build")
    if found:
        return found
    sibling = Path(sys.executable).parent / "trtllm-build"
    return str(sibling) if sibling.is_file() and os.access(sibling, os.X_OK) else None


def missing_tool_message(script: str | Path | None = None) -> str:
    where = f"run {script} there" if script else "run the written build_engine.sh there"
    return (
        "trtllm-build is not installed here (TensorRT-LLM does not install from PyPI outside NVIDIA's container). "
        f"Build the engine on a GPU host inside {container_image()} (TensorRT-LLM {TRTLLM_VERSION}; the legacy "
        f"trtllm-build / prompt-table flow ends with the 1.2 line): {where}, or rerun this command without "
        "--build to only write the checkpoint and the command."
    )


def run_trtllm_build(argv: list[str], log_path: str | Path, cwd: str | Path | None = None) -> None:
    """Run trtllm-build, streaming its output to the console and to `log_path`."""
    exe = find_trtllm_build()
    if exe is None:
        raise TrtllmBuildError(missing_tool_message())
    argv = [exe] + list(argv[1:])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    if code != 0:
        raise TrtllmBuildError(f"trtllm-build exited with {code}; see {log_path}")
