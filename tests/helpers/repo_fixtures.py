"""Engine folders as `mgm-build vision` / `mgm-build llm` leave them, without building: the contract files only."""

from __future__ import annotations

import json
from pathlib import Path

from mgm_ref.config import MGMConfig
from mgm_runtime.contract import LLMContract, derive_limits, write_llm_contract


def fake_vision(engine_dir: Path, ckpt: Path, backend: str, dtype: str = "float16") -> MGMConfig:
    """vision/config.json with the fields mgm-build vision writes that the repository reads."""
    cfg = MGMConfig.from_model_dir(ckpt)
    lr = [3, cfg.lr_size, cfg.lr_size]
    images = [cfg.views_per_image, *lr] if cfg.hd else lr
    (engine_dir / "vision").mkdir(parents=True, exist_ok=True)
    (engine_dir / "vision" / "config.json").write_text(
        json.dumps(
            {
                "backend": backend,
                "dtype": dtype,
                "max_batch_size": 4,
                "tokens_per_image": cfg.tokens_per_image,
                "hidden_size": cfg.hidden_size,
                "inputs": [
                    {"name": "images", "per_image_shape": images},
                    {"name": "images_aux", "per_image_shape": [3, cfg.image_size_aux, cfg.image_size_aux]},
                ],
            }
        )
    )
    return cfg


def fake_llm_engine(
    engine_dir: Path,
    cfg: MGMConfig,
    dtype: str = "float16",
    max_batch_size: int = 8,
    max_images_per_request: int = 1,
    vocab_offset: int | None = None,
    max_input_len: int | None = None,
) -> LLMContract:
    """llm/engine/config.json + llm/build_info.json carrying the contract mgm-build llm records."""
    (engine_dir / "llm" / "engine").mkdir(parents=True, exist_ok=True)
    (engine_dir / "llm" / "engine" / "config.json").write_text("{}")
    limits = derive_limits(
        max_batch_size=max_batch_size,
        tokens_per_image=cfg.tokens_per_image,
        max_images_per_request=max_images_per_request,
        max_input_len=max_input_len,
        default_input_len=cfg.max_length,
    )
    contract = LLMContract(
        runtime="tensorrt_llm",
        dtype=dtype,
        hidden_size=cfg.hidden_size,
        vocab_offset=vocab_offset or cfg.vocab_size,
        **limits,
    )
    write_llm_contract(engine_dir / "llm" / "build_info.json", contract)
    return contract
