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
`prompt_table_vocab_offset` upward, `tokens_per_image` rows per image, and (under "contract") the
limits `mgm-build repo` reads back.

This module runs the steps; llm_cli.py is the command line, llm_plan.py step 0 (what fits, the limits),
llm_provenance.py what build_info.json records, llm_calib.py the calibration data.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from build_engines import quantize as Q
from build_engines import trtllm as T
from build_engines.llm_cli import add_llm_arguments  # noqa: F401  (mgm-build's entry point)
from build_engines.llm_plan import LLMBuildError, gib, make_plan, peak_rss_bytes  # noqa: F401
from build_engines.llm_provenance import multimodal_contract, serve_contract, source_record, tool_versions


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
        self.log(
            f"[{self.index}/{self.total}] {title}: done in {elapsed:.1f} s (peak RSS {gib(self.peaks[key])}{extra})"
        )


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
                plan.model_dir,
                plan.config,
                tokenizer,
                plan.calib_size,
                mode=mode,
                conv_mode=args.conv_mode,
                image_dir=args.calib_image_dir,
                num_images=args.calib_num_images,
                dtype=torch_dtype,
                device=plan.device,
                max_len=args.calib_max_len,
                seed=args.seed,
                log=log,
            )

    with progress.step("load_llm", f"load the LLM ({args.dtype}, {plan.device}; vision weights left out)"):
        llm, _, _ = load_llm(plan.model_dir, dtype=torch_dtype, device=plan.device, config=plan.config)

    if quantizing:
        with progress.step(
            "quantize",
            f"quantize with ModelOpt {Q.modelopt_version()} ({args.qformat}"
            f"{', KV ' + args.kv_cache_dtype if args.kv_cache_dtype else ''})",
        ):
            loop = llm_calib.make_forward_loop(calib, log, every=max(1, len(calib.samples) // 4))
            Q.quantize(llm, args.qformat, args.kv_cache_dtype, loop, plan.config.family, args.awq_block_size)

    with progress.step("export", f"export TensorRT-LLM checkpoint (tp={args.tp_size}, pp={args.pp_size})"):
        _clear_checkpoint(plan.checkpoint_dir)
        trt_config = Q.export_checkpoint(
            llm,
            plan.config.family,
            args.dtype,
            plan.checkpoint_dir,
            args.tp_size,
            args.pp_size,
            args.qformat,
            args.kv_cache_dtype,
        )
        del llm
        ranks = sorted(p.name for p in plan.checkpoint_dir.glob("rank*.safetensors"))
        if len(ranks) != args.tp_size * args.pp_size:
            raise LLMBuildError(f"export wrote {ranks}, expected {args.tp_size * args.pp_size} ranks")
        log(
            f"  wrote {plan.checkpoint_dir}/config.json + {len(ranks)} rank files "
            f"({gib(sum((plan.checkpoint_dir / r).stat().st_size for r in ranks))})"
        )

    with progress.step("command", "write the trtllm-build command"):
        argv = T.trtllm_build_argv(
            Path("checkpoint"),
            Path("engine"),
            plan.limits,
            dtype=args.dtype,
            qformat=args.qformat,
            kv_cache_dtype=args.kv_cache_dtype,
            workers=args.workers,
        )
        script = T.write_build_script(plan.output_dir / "build_engine.sh", argv)
        log("  " + T.format_command(argv).replace("\n", "\n  "))

    info = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source_record(plan.model_dir, plan.config),
        "llm": Q.shape_summary(plan.shape),
        "quantization": {
            "qformat": args.qformat,
            "quant_algo": trt_config["quantization"].get("quant_algo"),
            "kv_cache_dtype": args.kv_cache_dtype,
            "kv_cache_quant_algo": trt_config["quantization"].get("kv_cache_quant_algo"),
            "dtype": args.dtype,
            "awq_block_size": args.awq_block_size if args.qformat == "int4_awq" else None,
            "calibration": None
            if calib is None
            else {
                "size": len(calib.samples),
                "mode": calib.mode,
                "reason": calib.reason,
                "conv_mode": calib.conv_mode,
                "image_source": calib.image_source,
                "seed": args.seed,
                **calib.stats,
            },
        },
        "parallel": {"tp_size": args.tp_size, "pp_size": args.pp_size, "ranks": ranks},
        "contract": serve_contract(plan, trt_config).to_dict(),
        "multimodal": multimodal_contract(plan, trt_config, calib.conv_mode if calib else args.conv_mode),
        "engine": {
            "limits": plan.limits.__dict__,
            "argv": argv,
            "script": script.name,
            "engine_dir": "engine",
            "built": False,
        },
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
    log(
        f"done in {time.perf_counter() - total_start:.1f} s: {plan.output_dir} "
        f"({'engine built' if built else 'run build_engine.sh on a GPU host to build the engine'})"
    )
    return LLMBuildResult(
        plan.output_dir,
        plan.checkpoint_dir,
        plan.engine_dir,
        script,
        info_path,
        argv,
        built,
        dict(progress.timings),
        info,
    )


def register_command(subparsers) -> None:
    """`mgm-build llm` (the mgm_build.commands entry point)."""
    help_text = "LLM -> ModelOpt quantization -> TensorRT-LLM checkpoint/engine"
    add_llm_arguments(subparsers.add_parser("llm", help=help_text, description=help_text)).set_defaults(
        run=run_llm_build
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m build_engines.llm ...` is `mgm-build llm ...`."""
    from build_engines.cli import run_command

    return run_command(register_command, argv)


if __name__ == "__main__":
    sys.exit(main())
