"""The `mgm-build llm` command line (snake_case flags, as TensorRT-LLM's own tools)."""

from __future__ import annotations

import argparse

from build_engines import quantize as Q
from build_engines import trtllm as T
from build_engines.llm_plan import CPU_CALIB_SIZE, GPU_CALIB_SIZE


def add_llm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model_dir", required=True, help="local MGM checkpoint folder (official format)")
    p.add_argument("--output_dir", required=True, help="where checkpoint/, build_engine.sh, build_info.json go")
    p.add_argument("--qformat", choices=Q.QFORMATS, default="full_prec", help="weight/activation quantization")
    p.add_argument("--kv_cache_dtype", choices=Q.KV_CACHE_DTYPES, default=None, help="quantize the KV cache")
    p.add_argument(
        "--dtype",
        choices=tuple(Q.DTYPES),
        default="float16",
        help="16-bit dtype to load the LLM in and for the unquantized parts of the engine",
    )
    p.add_argument("--tp_size", type=int, default=1, help="tensor parallel ranks")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline parallel ranks")
    p.add_argument(
        "--calib_size",
        type=int,
        default=None,
        help=f"calibration conversations (default {GPU_CALIB_SIZE} on GPU, {CPU_CALIB_SIZE} on CPU; "
        f"int4_awq uses at most {Q.AWQ_MAX_CALIB})",
    )
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument(
        "--max_input_len",
        type=int,
        default=None,
        help="engine prompt length INCLUDING the image tokens (576 or 2880 per image); "
        "default: the model's limit (tokenizer_model_max_length: 2048, 4096 for HD)",
    )
    p.add_argument(
        "--max_seq_len",
        type=int,
        default=None,
        help=f"prompt + generated tokens (default max_input_len + {T.DEFAULT_MAX_OUTPUT_LEN})",
    )
    p.add_argument("--max_images_per_request", type=int, default=1, help="images one request may carry")
    p.add_argument(
        "--build",
        action="store_true",
        help="run trtllm-build (needs TensorRT-LLM 1.2.1 and a GPU: the 26.07 trtllm image)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where to load and calibrate the LLM (auto: the GPU when there is one)",
    )
    p.add_argument(
        "--calib_images",
        choices=("auto", "on", "off"),
        default="auto",
        help="splice real projector outputs into calibration prompts (auto: when the vision path loads)",
    )
    p.add_argument("--calib_image_dir", default=None, help="images for calibration (default: synthetic images)")
    p.add_argument("--calib_num_images", type=int, default=16, help="distinct calibration images")
    p.add_argument("--calib_max_len", type=int, default=None, help="truncate calibration samples (positions)")
    p.add_argument("--conv_mode", default=None, help="chat template for calibration (default: detected)")
    p.add_argument("--awq_block_size", type=int, default=Q.AWQ_BLOCK_SIZE)
    p.add_argument("--workers", type=int, default=1, help="trtllm-build --workers (parallel rank builds)")
    p.add_argument("--seed", type=int, default=0)
    return p
