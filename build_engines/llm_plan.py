"""Step 0 of `mgm-build llm`: read config.json only and refuse, before any weights load, what cannot be
built or will not fit (host memory, GPU memory for calibration, disk); fill the engine limits.
"""

from __future__ import annotations

import argparse
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from build_engines import quantize as Q
from build_engines import trtllm as T
from mgm_ref.errors import MGMError

CPU_CALIB_SIZE = 32  # default on CPU (TensorRT-LLM's default of 512 is meant for GPUs)
GPU_CALIB_SIZE = 512
# Peak host memory relative to the 16-bit weights, plus a fixed allowance for torch/ModelOpt. Measured on CPU
# (client/bench/llm_build.py, 0.34 B params, 0.63 GiB): 1.63 GiB peak for full_prec/fp8/int8_sq (loading holds
# the checkpoint's tensors and the model at once: ~1.8x), 2.0 GiB for int4_awq (~2.4x); 0.48 GiB baseline.
HOST_MEMORY_FACTOR = 2.5
HOST_MEMORY_OVERHEAD = 1.5 * 2**30
GPU_MEMORY_FACTOR = 1.3  # weights + quantizer state + calibration activations


class LLMBuildError(MGMError):
    """A user-facing failure of `mgm-build llm` (bad option, model too big, missing tool)."""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def host_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


@dataclass
class Plan:
    model_dir: Path
    output_dir: Path
    config: object  # mgm_ref.config.MGMConfig
    shape: Q.LLMShape
    device: str
    calib_size: int
    limits: T.EngineLimits
    warnings: list[str] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoint"

    @property
    def engine_dir(self) -> Path:
        return self.output_dir / "engine"


def pick_device(requested: str, weight_bytes: int) -> tuple[str, list[str]]:
    notes = []
    if requested == "cuda" and not torch.cuda.is_available():
        raise LLMBuildError("--device cuda was asked for but no CUDA GPU is visible")
    if requested == "cpu" or not torch.cuda.is_available():
        return "cpu", notes
    free, _total = torch.cuda.mem_get_info()
    need = int(weight_bytes * GPU_MEMORY_FACTOR)
    if need > free:
        if requested == "cuda":
            raise LLMBuildError(
                f"the LLM needs about {gib(need)} of GPU memory for calibration, "
                f"the GPU has {gib(free)} free; use --device cpu (slow) or a larger GPU"
            )
        notes.append(f"the LLM needs about {gib(need)} of GPU memory, {gib(free)} is free: calibrating on the CPU")
        return "cpu", notes
    return "cuda", notes


def check_host_memory(weight_bytes: int, device: str) -> list[str]:
    need = int(weight_bytes * HOST_MEMORY_FACTOR + HOST_MEMORY_OVERHEAD)
    have = host_available_bytes()
    if have is not None and need > have:
        raise LLMBuildError(
            f"quantize + export needs about {gib(need)} of host memory (16-bit weights {gib(weight_bytes)} x "
            f"{HOST_MEMORY_FACTOR} + {gib(HOST_MEMORY_OVERHEAD)}), only {gib(have)} is available; "
            "free memory or run on a larger host"
        )
    return [] if have is None else [f"host memory: need ~{gib(need)}, available {gib(have)} ({device})"]


def checkpoint_bytes(shape: Q.LLMShape, qformat: str) -> int:
    per_param = {"full_prec": 2.0, "fp8": 1.0, "int8_sq": 1.0, "int4_awq": 0.55}[qformat]
    embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return int((shape.param_count() - embed) * per_param + embed * 2)


def make_plan(args: argparse.Namespace, log: Callable[[str], None] = print) -> Plan:
    from mgm_ref.config import MGMConfig

    model_dir, output_dir = Path(args.model_dir), Path(args.output_dir)
    config = MGMConfig.from_model_dir(model_dir)
    shape = Q.LLMShape.from_hf_config(config.family, config.llm_config)
    warnings = Q.check_combination(
        shape, args.qformat, args.kv_cache_dtype, args.dtype, args.tp_size, args.pp_size, args.awq_block_size
    )
    if args.build and T.find_trtllm_build() is None:
        raise LLMBuildError(T.missing_tool_message(output_dir / "build_engine.sh"))
    limits = T.engine_limits(
        max_batch_size=args.max_batch_size,
        tokens_per_image=config.tokens_per_image,
        max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len,
        max_images_per_request=args.max_images_per_request,
        default_input_len=config.max_length,
    )
    if config.family == "gemma" and getattr(config.llm_config, "hidden_activation", None) == "gelu":
        warnings.append(
            "Gemma's MLP uses exact (erf) GELU as MGM-2B was trained; the exported hidden_act 'gelu' "
            "runs as TensorRT-LLM's tanh-approximated gelu (functional.gelu), a small numeric change"
        )
    max_pos = getattr(config.llm_config, "max_position_embeddings", None)
    if max_pos and limits.max_seq_len > max_pos:
        warnings.append(f"max_seq_len {limits.max_seq_len} exceeds the LLM's max_position_embeddings {max_pos}")
    if config.hd and args.max_images_per_request > 1:
        raise LLMBuildError("HD models take one image per request (2880 rows); use --max_images_per_request 1")
    weight_bytes = shape.param_count() * 2
    device, notes = pick_device(args.device, weight_bytes)
    warnings += notes
    memory_note = check_host_memory(weight_bytes, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(output_dir).free
    need_disk = checkpoint_bytes(shape, args.qformat)
    if need_disk * 1.1 > free_disk:
        raise LLMBuildError(f"the checkpoint needs about {gib(need_disk)} on disk, {output_dir} has {gib(free_disk)}")
    calib_size = args.calib_size or (GPU_CALIB_SIZE if device == "cuda" else CPU_CALIB_SIZE)
    if args.qformat == "int4_awq" and calib_size > Q.AWQ_MAX_CALIB:
        warnings.append(
            f"int4_awq: calibrating on {Q.AWQ_MAX_CALIB} samples instead of {calib_size} "
            "(AWQ's scale search is slow; TensorRT-LLM's quantize.py does the same)"
        )
        calib_size = Q.AWQ_MAX_CALIB
    if calib_size < 1:
        raise LLMBuildError(f"--calib_size must be >= 1, got {calib_size}")
    log(
        f"plan: {config.family} LLM ({shape.param_count() / 1e9:.3f} B params, {gib(weight_bytes)} in 16-bit) "
        f"from {model_dir}; {'HD, ' if config.hd else ''}{config.tokens_per_image} image tokens per image; "
        f"qformat={args.qformat} kv_cache={args.kv_cache_dtype or 'model dtype'} dtype={args.dtype} "
        f"tp={args.tp_size} pp={args.pp_size}; device={device}; " + "; ".join(memory_note)
    )
    for w in warnings:
        log(f"warning: {w}")
    return Plan(model_dir, output_dir, config, shape, device, calib_size, limits, warnings)
