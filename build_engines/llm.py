"""`mgm-build llm`: MGM's language model -> ModelOpt quantization -> TensorRT-LLM checkpoint -> trtllm-build.

    mgm-build llm --model_dir DIR --output_dir OUT [--qformat full_prec|fp8|int4_awq|int8_sq]
                  [--kv_cache_dtype fp8|int8] [--dtype float16|bfloat16] [--tp_size N] [--pp_size N]
                  [--calib_size N] [--max_batch_size N] [--max_input_len N] [--max_seq_len N] [--build]

Steps (each reports its time and the peak memory so far):
  0. plan: read config.json only; refuse unsupported combinations and models that will not fit, up front
  1. calibration data: MGM chat prompts, image rows from mgm_ref's vision path when it loads (else text only)
  2. load the LLM alone (no vision keys) in 16-bit, on the GPU when there is one
  3. quantize with ModelOpt (skipped for full_prec without a quantized KV cache)
  4. export OUT/checkpoint/{config.json, rank{i}.safetensors} (tp x pp ranks) and OUT/build_info.json
  5. write OUT/build_engine.sh (the exact trtllm-build command); with --build, run it into OUT/engine

build_info.json records the provenance (source, qformat, calibration, tool versions) and the multimodal
contract a runtime needs: image rows go in the prompt table, addressed by fake ids from
`prompt_table_vocab_offset` upward, `tokens_per_image` rows per image.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from build_engines import quantize as Q
from build_engines import trtllm as T
from mgm_runtime.contract import LLMContract

CPU_CALIB_SIZE = 32                 # default on CPU (TensorRT-LLM's default of 512 is meant for GPUs)
GPU_CALIB_SIZE = 512
# Peak host memory relative to the 16-bit weights, plus a fixed allowance for torch/ModelOpt. Measured on CPU
# (build_engines/llm_bench.py, 0.34 B params, 0.63 GiB): 1.63 GiB peak for full_prec/fp8/int8_sq (loading holds
# the checkpoint's tensors and the model at once: ~1.8x), 2.0 GiB for int4_awq (~2.4x); 0.48 GiB baseline.
HOST_MEMORY_FACTOR = 2.5
HOST_MEMORY_OVERHEAD = 1.5 * 2**30
GPU_MEMORY_FACTOR = 1.3             # weights + quantizer state + calibration activations


class LLMBuildError(ValueError):
    """A user-facing failure of `mgm-build llm` (bad option, model too big, missing tool)."""


# ---- CLI -----------------------------------------------------------------------------------------
def add_llm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model_dir", required=True, help="local MGM checkpoint folder (official format)")
    p.add_argument("--output_dir", required=True, help="where checkpoint/, build_engine.sh, build_info.json go")
    p.add_argument("--qformat", choices=Q.QFORMATS, default="full_prec", help="weight/activation quantization")
    p.add_argument("--kv_cache_dtype", choices=Q.KV_CACHE_DTYPES, default=None, help="quantize the KV cache")
    p.add_argument("--dtype", choices=tuple(Q.DTYPES), default="float16",
                   help="16-bit dtype to load the LLM in and for the unquantized parts of the engine")
    p.add_argument("--tp_size", type=int, default=1, help="tensor parallel ranks")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline parallel ranks")
    p.add_argument("--calib_size", type=int, default=None,
                   help=f"calibration conversations (default {GPU_CALIB_SIZE} on GPU, {CPU_CALIB_SIZE} on CPU; "
                        f"int4_awq uses at most {Q.AWQ_MAX_CALIB})")
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--max_input_len", type=int, default=None,
                   help="engine prompt length INCLUDING the image tokens (576 or 2880 per image); "
                        "default: the model's limit (tokenizer_model_max_length: 2048, 4096 for HD)")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help=f"prompt + generated tokens (default max_input_len + {T.DEFAULT_MAX_OUTPUT_LEN})")
    p.add_argument("--max_images_per_request", type=int, default=1, help="images one request may carry")
    p.add_argument("--build", action="store_true", help="run trtllm-build (needs TensorRT-LLM 1.2.x and a GPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to load and calibrate the LLM (auto: the GPU when there is one)")
    p.add_argument("--calib_images", choices=("auto", "on", "off"), default="auto",
                   help="splice real projector outputs into calibration prompts (auto: when the vision path loads)")
    p.add_argument("--calib_image_dir", default=None, help="images for calibration (default: synthetic images)")
    p.add_argument("--calib_num_images", type=int, default=16, help="distinct calibration images")
    p.add_argument("--calib_max_len", type=int, default=None, help="truncate calibration samples (positions)")
    p.add_argument("--conv_mode", default=None, help="chat template for calibration (default: detected)")
    p.add_argument("--awq_block_size", type=int, default=Q.AWQ_BLOCK_SIZE)
    p.add_argument("--workers", type=int, default=1, help="trtllm-build --workers (parallel rank builds)")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---- progress and memory ---------------------------------------------------------------------------
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


class Progress:
    """Numbered steps with wall time and peak memory, printed as they finish and kept for build_info."""

    def __init__(self, total: int, log: Callable[[str], None] = print):
        self.total, self.log, self.index = total, log, 0
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def step(self, key: str, title: str):
        self.index += 1
        self.log(f"[{self.index}/{self.total}] {title} ...")
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        yield
        elapsed = time.perf_counter() - start
        self.timings[key] = round(elapsed, 3)
        self.peaks[key] = peak_rss_bytes()
        extra = f", GPU peak {gib(torch.cuda.max_memory_allocated())}" if torch.cuda.is_available() else ""
        self.log(f"[{self.index}/{self.total}] {title}: done in {elapsed:.1f} s (peak RSS {gib(self.peaks[key])}{extra})")


# ---- plan -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    model_dir: Path
    output_dir: Path
    config: object                  # mgm_ref.config.MGMConfig
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
            raise LLMBuildError(f"the LLM needs about {gib(need)} of GPU memory for calibration, "
                                f"the GPU has {gib(free)} free; use --device cpu (slow) or a larger GPU")
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
    warnings = Q.check_combination(shape, args.qformat, args.kv_cache_dtype, args.dtype, args.tp_size,
                                   args.pp_size, args.awq_block_size)
    if args.build and T.find_trtllm_build() is None:
        raise LLMBuildError(T.missing_tool_message(output_dir / "build_engine.sh"))
    limits = T.engine_limits(max_batch_size=args.max_batch_size, tokens_per_image=config.tokens_per_image,
                             max_input_len=args.max_input_len, max_seq_len=args.max_seq_len,
                             max_images_per_request=args.max_images_per_request,
                             default_input_len=config.max_length)
    if config.family == "gemma" and getattr(config.llm_config, "hidden_activation", None) == "gelu":
        warnings.append("Gemma's MLP uses exact (erf) GELU as MGM-2B was trained; the exported hidden_act 'gelu' "
                        "runs as TensorRT-LLM's tanh-approximated gelu (functional.gelu), a small numeric change")
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
        warnings.append(f"int4_awq: calibrating on {Q.AWQ_MAX_CALIB} samples instead of {calib_size} "
                        "(AWQ's scale search is slow; TensorRT-LLM's quantize.py does the same)")
        calib_size = Q.AWQ_MAX_CALIB
    if calib_size < 1:
        raise LLMBuildError(f"--calib_size must be >= 1, got {calib_size}")
    log(f"plan: {config.family} LLM ({shape.param_count() / 1e9:.3f} B params, {gib(weight_bytes)} in 16-bit) "
        f"from {model_dir}; {'HD, ' if config.hd else ''}{config.tokens_per_image} image tokens per image; "
        f"qformat={args.qformat} kv_cache={args.kv_cache_dtype or 'model dtype'} dtype={args.dtype} "
        f"tp={args.tp_size} pp={args.pp_size}; device={device}; " + "; ".join(memory_note))
    for w in warnings:
        log(f"warning: {w}")
    return Plan(model_dir, output_dir, config, shape, device, calib_size, limits, warnings)


# ---- provenance -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_record(model_dir: Path, config) -> dict:
    shards = sorted(p for p in model_dir.glob("*.safetensors"))
    return {
        "model_dir": str(model_dir.resolve()),
        "architecture": config.architecture,
        "family": config.family,
        "hd": config.hd,
        "config_sha256": _sha256(model_dir / "config.json"),
        "shards": [{"file": p.name, "bytes": p.stat().st_size} for p in shards],
    }


def tool_versions() -> dict:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "modelopt": Q.modelopt_version(),
                "tensorrt_llm_target": T.TRTLLM_VERSION, "image_target": T.DEFAULT_IMAGE}
    try:
        from importlib.metadata import version
        versions["mgm-deploy"] = version("mgm-deploy")
    except ImportError:
        versions["mgm-deploy"] = "source tree"
    try:
        import tensorrt_llm
        versions["tensorrt_llm"] = tensorrt_llm.__version__
    except ImportError:
        versions["tensorrt_llm"] = "not installed"
    return versions


def serve_contract(plan: Plan, trt_config: dict) -> LLMContract:
    """What mgm-build repo reads back: the engine's limits, dtype and first fake id (never recomputed there)."""
    return LLMContract(runtime="tensorrt_llm", dtype=trt_config["dtype"], hidden_size=plan.shape.hidden_size,
                       vocab_offset=trt_config["vocab_size"], **asdict(plan.limits))


def multimodal_contract(plan: Plan, trt_config: dict, conv_mode: str | None) -> dict:
    gemma = plan.config.family == "gemma"
    return {
        "prompt_table_vocab_offset": trt_config["vocab_size"],
        "fake_ids": "image row k of a request is token id prompt_table_vocab_offset + k; every request sends "
                    "its own [rows, hidden] prompt table (in-flight batching keeps one table per request), so "
                    "each request's fake ids restart at the offset; at most max_multimodal_len // max_batch_size "
                    "rows per request; requests without images send no table",
        "tokens_per_image": plan.config.tokens_per_image,
        "max_images_per_request": plan.limits.max_images_per_request,
        "hidden_size": plan.shape.hidden_size,
        "embedding_scale": ("sqrt(hidden_size) is applied inside the engine to text and prompt-table rows "
                            "alike (as HF GemmaModel does to inputs_embeds): feed raw projector outputs"
                            if gemma else None),
        "conv_mode": conv_mode,
    }


# ---- the build ---------------------------------------------------------------------------------------
@dataclass
class LLMBuildResult:
    output_dir: Path
    checkpoint_dir: Path
    engine_dir: Path
    script: Path
    build_info: Path
    argv: list[str]
    built: bool
    timings: dict[str, float]
    info: dict


def _clear_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("rank*.safetensors")) + [folder / "config.json", folder / "quant_cfg.json"]:
        if stale.is_file():
            stale.unlink()


def run_llm_build(args: argparse.Namespace, log: Callable[[str], None] = print) -> LLMBuildResult:
    """Run the whole LLM path for parsed `args` (see `add_llm_arguments`)."""
    from build_engines import llm_calib
    from mgm_ref.loader import load_llm, load_tokenizer

    torch.manual_seed(args.seed)
    total_start = time.perf_counter()
    plan = make_plan(args, log)
    quantizing = Q.needs_calibration(args.qformat, args.kv_cache_dtype)
    progress = Progress(total=3 + 2 * int(quantizing) + int(args.build), log=log)
    torch_dtype = Q.DTYPES[args.dtype]
    calib = None

    if quantizing:
        with progress.step("calibration_data", "calibration data (MGM prompts)"):
            tokenizer = load_tokenizer(plan.model_dir)
            mode = {"auto": "auto", "on": "multimodal", "off": "text"}[args.calib_images]
            calib = llm_calib.build_calibration_set(
                plan.model_dir, plan.config, tokenizer, plan.calib_size, mode=mode, conv_mode=args.conv_mode,
                image_dir=args.calib_image_dir, num_images=args.calib_num_images, dtype=torch_dtype,
                device=plan.device, max_len=args.calib_max_len, seed=args.seed, log=log)

    with progress.step("load_llm", f"load the LLM ({args.dtype}, {plan.device}; vision weights left out)"):
        llm, _, _ = load_llm(plan.model_dir, dtype=torch_dtype, device=plan.device, config=plan.config)

    if quantizing:
        with progress.step("quantize", f"quantize with ModelOpt {Q.modelopt_version()} ({args.qformat}"
                                       f"{', KV ' + args.kv_cache_dtype if args.kv_cache_dtype else ''})"):
            loop = llm_calib.make_forward_loop(calib, log, every=max(1, len(calib.samples) // 4))
            Q.quantize(llm, args.qformat, args.kv_cache_dtype, loop, plan.config.family, args.awq_block_size)

    with progress.step("export", f"export TensorRT-LLM checkpoint (tp={args.tp_size}, pp={args.pp_size})"):
        _clear_checkpoint(plan.checkpoint_dir)
        trt_config = Q.export_checkpoint(llm, plan.config.family, args.dtype, plan.checkpoint_dir,
                                         args.tp_size, args.pp_size, args.qformat, args.kv_cache_dtype)
        del llm
        ranks = sorted(p.name for p in plan.checkpoint_dir.glob("rank*.safetensors"))
        if len(ranks) != args.tp_size * args.pp_size:
            raise LLMBuildError(f"export wrote {ranks}, expected {args.tp_size * args.pp_size} ranks")
        log(f"  wrote {plan.checkpoint_dir}/config.json + {len(ranks)} rank files "
            f"({gib(sum((plan.checkpoint_dir / r).stat().st_size for r in ranks))})")

    with progress.step("command", "write the trtllm-build command"):
        argv = T.trtllm_build_argv(Path("checkpoint"), Path("engine"), plan.limits, dtype=args.dtype,
                                   qformat=args.qformat, kv_cache_dtype=args.kv_cache_dtype, workers=args.workers)
        script = T.write_build_script(plan.output_dir / "build_engine.sh", argv)
        log("  " + T.format_command(argv).replace("\n", "\n  "))

    info = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source_record(plan.model_dir, plan.config),
        "llm": Q.shape_summary(plan.shape),
        "quantization": {
            "qformat": args.qformat, "quant_algo": trt_config["quantization"].get("quant_algo"),
            "kv_cache_dtype": args.kv_cache_dtype,
            "kv_cache_quant_algo": trt_config["quantization"].get("kv_cache_quant_algo"),
            "dtype": args.dtype,
            "awq_block_size": args.awq_block_size if args.qformat == "int4_awq" else None,
            "calibration": None if calib is None else {
                "size": len(calib.samples), "mode": calib.mode, "reason": calib.reason, "conv_mode": calib.conv_mode,
                "image_source": calib.image_source, "seed": args.seed, **calib.stats},
        },
        "parallel": {"tp_size": args.tp_size, "pp_size": args.pp_size, "ranks": ranks},
        "contract": serve_contract(plan, trt_config).to_dict(),
        "multimodal": multimodal_contract(plan, trt_config, calib.conv_mode if calib else args.conv_mode),
        "engine": {"limits": plan.limits.__dict__, "argv": argv, "script": script.name,
                   "engine_dir": "engine", "built": False},
        "tools": tool_versions(),
        "device": plan.device,
        "warnings": plan.warnings,
    }
    info_path = plan.output_dir / "build_info.json"

    def save_info():
        info["timings_s"] = dict(progress.timings, total=round(time.perf_counter() - total_start, 3))
        info["peak_rss_gib"] = round(peak_rss_bytes() / 2**30, 3)
        info_path.write_text(json.dumps(info, indent=2))

    save_info()
    built = False
    if args.build:
        with progress.step("trtllm_build", "trtllm-build"):
            T.run_trtllm_build(argv, plan.output_dir / "trtllm_build.log", cwd=plan.output_dir)
        built = True
        info["engine"]["built"] = True
        save_info()
    log(f"done in {time.perf_counter() - total_start:.1f} s: {plan.output_dir} "
        f"({'engine built' if built else 'run build_engine.sh on a GPU host to build the engine'})")
    return LLMBuildResult(plan.output_dir, plan.checkpoint_dir, plan.engine_dir, script, info_path, argv, built,
                          dict(progress.timings), info)


def main(argv: list[str] | None = None) -> int:
    """`python -m build_engines.llm ...` is `mgm-build llm ...`."""
    from build_engines.cli import main as cli_main

    return cli_main(["llm", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
