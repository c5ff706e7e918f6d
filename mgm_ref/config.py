"""Parse an official MGM config.json into one object that says what to build.

Official configs do not describe the towers (the original derives them from folder names), so the
architectures come from the optional `mm_vision_tower_config` (a CLIPVisionConfig dict) and
`mm_vision_tower_aux_config` ({"dims", "depths"}) blocks, or default to the real CLIP ViT-L/14-336
and ConvNeXt-L; the loader then checks the weights' shapes against them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPVisionConfig, GemmaConfig, LlamaConfig, MixtralConfig, PretrainedConfig

from mgm_ref.constants import CLIP_VIT_L_336, CONVNEXT_LARGE, LR_IMAGE_SIZE, LR_TOKENS_PER_VIEW
from mgm_ref.errors import CheckpointError

# architecture in config.json -> (LLM family, HF config class, HF architecture name)
ARCHITECTURES = {
    "MGMLlamaForCausalLM": ("llama", LlamaConfig, "LlamaForCausalLM"),
    "MGMGemmaForCausalLM": ("gemma", GemmaConfig, "GemmaForCausalLM"),
    "MGMMixtralForCausalLM": ("mixtral", MixtralConfig, "MixtralForCausalLM"),
}
FAMILY_TO_ARCH = {family: arch for arch, (family, _, _) in ARCHITECTURES.items()}

# Keys that describe the multimodal part; everything else in config.json belongs to the LLM.
_MM_PREFIXES = ("mm_", "image_", "vision_", "tokenizer_", "tune_", "freeze_", "optimize_")
_MM_KEYS = {"use_mm_proj", "model_path", "architectures", "model_type", "auto_map"}


@dataclass
class MGMConfig:
    raw: dict
    family: str
    llm_config: PretrainedConfig
    clip_config: CLIPVisionConfig
    convnext_dims: list[int]
    convnext_depths: list[int]
    image_size_aux: int
    image_grid: int
    image_global: bool
    select_layer: int
    mm_hidden_size: int
    mm_hidden_size_aux: int
    max_length: int

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def hd(self) -> bool:
        return self.image_grid > 1

    @property
    def lr_size(self) -> int:
        return LR_IMAGE_SIZE

    @property
    def lr_input_size(self) -> int:
        """Side of the LR image before it is cut into crops (336, or 672 for HD)."""
        return LR_IMAGE_SIZE * self.image_grid

    @property
    def views_per_image(self) -> int:
        return self.image_grid**2 + int(self.image_global)

    @property
    def tokens_per_image(self) -> int:
        return LR_TOKENS_PER_VIEW * self.views_per_image

    @property
    def hidden_size(self) -> int:
        return self.llm_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.llm_config.vocab_size

    @property
    def architecture(self) -> str:
        return FAMILY_TO_ARCH[self.family]

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> MGMConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no config.json (expected a local MGM checkpoint folder)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> MGMConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"{source}: architectures={archs} is not an MGM model; expected one of {sorted(ARCHITECTURES)}"
            )
        family, llm_config_cls, hf_arch = ARCHITECTURES[arch]

        def require(key, allowed):
            value = raw.get(key, allowed[0])
            if value not in allowed:
                raise CheckpointError(f"{source}: {key}={value!r} is not supported (supported: {allowed})")
            return value

        require("mm_projector_type", ["mlp2x_gelu"])
        require("mm_vision_select_feature", ["patch"])
        require("image_aspect_ratio", ["pad"])
        require("mm_use_im_start_end", [False])
        image_grid = require("image_grid", [1, 2])
        image_global = bool(raw.get("image_global", False))
        if image_grid == 2 and not image_global:
            raise CheckpointError(f"{source}: image_grid=2 without image_global is not an MGM HD variant")
        if image_grid == 1 and image_global:
            raise CheckpointError(f"{source}: image_global=true needs image_grid=2")

        clip_dict = dict(CLIP_VIT_L_336)
        clip_dict.update(raw.get("mm_vision_tower_config") or {})
        clip_config = CLIPVisionConfig(**clip_dict)
        clip_config._attn_implementation = "eager"  # exact math, and what the ONNX export sees
        aux = raw.get("mm_vision_tower_aux_config") or CONVNEXT_LARGE
        dims, depths = list(aux["dims"]), list(aux["depths"])
        if len(dims) != 4 or len(depths) != 4:
            raise CheckpointError(f"{source}: mm_vision_tower_aux_config needs 4 dims and 4 depths, got {aux}")

        mm_hidden = int(raw.get("mm_hidden_size", clip_config.hidden_size))
        mm_hidden_aux = int(raw.get("mm_hidden_size_aux", sum(dims)))
        if mm_hidden != clip_config.hidden_size:
            raise CheckpointError(f"{source}: mm_hidden_size={mm_hidden} != CLIP hidden size {clip_config.hidden_size}")
        if mm_hidden_aux != sum(dims):
            raise CheckpointError(f"{source}: mm_hidden_size_aux={mm_hidden_aux} != sum of ConvNeXt dims {sum(dims)}")
        if (clip_config.image_size // clip_config.patch_size) ** 2 != LR_TOKENS_PER_VIEW:
            raise CheckpointError(f"{source}: the CLIP tower must see {LR_TOKENS_PER_VIEW} patches per view")

        image_size_aux = int(raw.get("image_size_aux", 768 * image_grid))
        grid_side = int(LR_TOKENS_PER_VIEW**0.5)
        if image_size_aux % (4 * grid_side * image_grid):
            raise CheckpointError(
                f"{source}: image_size_aux={image_size_aux} must be a multiple of {4 * grid_side * image_grid} "
                "so that every LR token owns a whole window of HR pixels"
            )

        llm_dict = {k: v for k, v in raw.items() if k not in _MM_KEYS and not k.startswith(_MM_PREFIXES)}
        llm_dict["architectures"] = [hf_arch]
        if family == "gemma":
            # MGM-2B was trained under transformers 4.38, whose Gemma MLP ran `hidden_act` (exact GELU);
            # newer releases read `hidden_activation` and default to the tanh approximation.
            llm_dict.setdefault("hidden_activation", raw.get("hidden_act", "gelu"))
            llm_dict["hidden_act"] = llm_dict["hidden_activation"]
        llm_config = llm_config_cls(**llm_dict)

        return cls(
            raw=raw,
            family=family,
            llm_config=llm_config,
            clip_config=clip_config,
            convnext_dims=dims,
            convnext_depths=depths,
            image_size_aux=image_size_aux,
            image_grid=image_grid,
            image_global=image_global,
            select_layer=int(raw.get("mm_vision_select_layer", -2)),
            mm_hidden_size=mm_hidden,
            mm_hidden_size_aux=mm_hidden_aux,
            max_length=int(raw.get("tokenizer_model_max_length") or (4096 if image_grid > 1 else 2048)),
        )
