"""What build_info.json records besides the timings: where the LLM came from, with which tools, and the
build->serve contract (mgm_runtime.contract) plus its human-readable multimodal notes.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from build_engines import quantize as Q
from build_engines import trtllm as T
from build_engines.llm_plan import Plan
from mgm_runtime.contract import LLMContract


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

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modelopt": Q.modelopt_version(),
        "tensorrt_llm_target": T.TRTLLM_VERSION,
        "image_target": T.DEFAULT_IMAGE,
    }
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
    return LLMContract(
        runtime="tensorrt_llm",
        dtype=trt_config["dtype"],
        hidden_size=plan.shape.hidden_size,
        vocab_offset=trt_config["vocab_size"],
        **asdict(plan.limits),
    )


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
        "embedding_scale": (
            "sqrt(hidden_size) is applied inside the engine to text and prompt-table rows "
            "alike (as HF GemmaModel does to inputs_embeds): feed raw projector outputs"
            if gemma
            else None
        ),
        "conv_mode": conv_mode,
    }
