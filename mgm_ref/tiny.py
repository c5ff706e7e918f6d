"""Write tiny random MGM checkpoints in exactly the official format, for tests and the demo.

    python -m mgm_ref.tiny --llm {llama,gemma,mixtral} [--hd] --out DIR [--seed N] [--template NAME]

config.json with the official keys (plus the tower-architecture blocks), sharded safetensors with the
official key names and an index, and a real byte-level BPE tokenizer built with `tokenizers` that
carries the template's special tokens. Weights are stored in bf16 like the released checkpoints and
are bf16-exact, so a float32 load reproduces the in-memory model bit for bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mgm_ref.config import FAMILY_TO_ARCH, MGMConfig
from mgm_ref.constants import CLIP_VIT_L_336, CONVNEXT_LARGE
from mgm_ref.conversation import LLAMA3_SYSTEM, TEMPLATES, VICUNA_SYSTEM
from mgm_ref.loader import vision_to_official_key
from mgm_ref.vision import MGMVisionEncoder

VOCAB_SIZE = 1024
MODEL_TYPES = {"llama": "mgm", "gemma": "mgm_gemma", "mixtral": "mgm_mixtral"}
DEFAULT_TEMPLATE = {"llama": "vicuna_v1", "gemma": "gemma", "mixtral": "mistral_instruct"}
FAMILY_TEMPLATES = {
    "llama": ("vicuna_v1", "llama_3", "chatml_direct"),
    "gemma": ("gemma",),
    "mixtral": ("mistral_instruct",),
}

# Sizes: in-features are multiples of 128 so INT4 AWQ (block 128) accepts every linear layer.
LLM_SIZES: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "gemma": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="gelu",
        tie_word_embeddings=True,
    ),
    "mixtral": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}
CLIP_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=64,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
CONVNEXT_TINY = {"dims": [16, 32, 64, 128], "depths": [1, 1, 2, 1]}

SPECIAL_TOKENS = {  # (bos, eos, unk, pad, extra specials)
    "vicuna_v1": ("<s>", "</s>", "<unk>", "<unk>", []),
    "mistral_instruct": ("<s>", "</s>", "<unk>", "<unk>", []),
    "gemma": ("<bos>", "<eos>", "<unk>", "<pad>", ["<start_of_turn>", "<end_of_turn>"]),
    "llama_3": (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        None,
        None,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "chatml_direct": ("<|startoftext|>", "<|im_end|>", "<unk>", "<unk>", ["<|im_start|>", "<|im_end|>"]),
}

CORPUS = [
    VICUNA_SYSTEM,
    LLAMA3_SYSTEM,
    "Answer the questions.",
    "What is shown in this image? Describe the picture in detail.",
    "The image shows a red car parked next to a small house with a green door.",
    "There are two cats sleeping on a blue sofa near the window.",
    "Reference OCR Token: STOP, EXIT, 42, Main Street",
    "A photo of a dog running on the beach at sunset, with waves and birds in the sky.",
    "Generate an image of a castle in the mountains. <GEN> <h> a castle on a hill, oil painting </h>",
    "USER: ASSISTANT: [INST] [/INST] user model system assistant",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,:;'\"()[]{}<>-_/+=*&%$#@",
]


def synthetic_scene(width: int = 640, height: int = 480, seed: int = 0, noise: int = 0) -> Image.Image:
    """A deterministic RGB scene (sky gradient, sun, house, field; `seed` moves and recolours them).

    The one synthetic image of the project (tests, demo, benchmarks, calibration): photo-like rather
    than random pixels, so encoded files stay small and image features are not those of noise.
    `noise` adds uniform sensor noise of +-noise levels.
    """
    rng = np.random.RandomState(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([200, 225, 250]) * y) * np.ones((1, width, 1))
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = min(width, height) / 480
    horizon = int(height * (0.65 + 0.1 * rng.rand()))
    d.rectangle([0, horizon, width, height], fill=(60 + rng.randint(40), 150, 60))
    sx, sy = int(width * (0.6 + 0.3 * rng.rand())), int(height * 0.15)
    d.ellipse([sx, sy, sx + int(90 * s), sy + int(90 * s)], fill=(250, 215, 60))
    hx, hw = int(width * (0.15 + 0.3 * rng.rand())), int(200 * s)
    d.rectangle([hx, horizon - int(130 * s), hx + hw, horizon + int(10 * s)], fill=(200, 60 + rng.randint(60), 50))
    d.polygon(
        [
            (hx - int(20 * s), horizon - int(130 * s)),
            (hx + hw // 2, horizon - int(220 * s)),
            (hx + hw + int(20 * s), horizon - int(130 * s)),
        ],
        fill=(120, 70, 40),
    )
    d.rectangle(
        [hx + hw // 2 - int(20 * s), horizon - int(60 * s), hx + hw // 2 + int(20 * s), horizon + int(10 * s)],
        fill=(90, 50, 30),
    )
    if not noise:
        return img
    pixels = np.asarray(img, np.int16) + rng.randint(-noise, noise + 1, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def build_tokenizer(template: str) -> PreTrainedTokenizerFast:
    bos, eos, unk, pad, extra = SPECIAL_TOKENS[template]
    specials = list(dict.fromkeys(t for t in (pad, eos, bos, unk, *extra) if t))
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        additional_special_tokens=extra,
        model_max_length=4096,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def tiny_config_dict(
    llm: str = "llama", hd: bool = False, template: str | None = None, vision: str = "tiny"
) -> tuple[dict[str, Any], PreTrainedTokenizerFast]:
    """`vision="real"`: the real CLIP ViT-L/14-336 and ConvNeXt-L towers (random weights) in front of the
    tiny LLM, for benchmarks where the vision cost must be that of a real checkpoint."""
    if vision not in ("tiny", "real"):
        raise ValueError(f"vision must be tiny or real, got {vision!r}")
    template = template or DEFAULT_TEMPLATE[llm]
    if template not in FAMILY_TEMPLATES[llm]:
        raise ValueError(f"template {template!r} does not belong to {llm} (choose from {FAMILY_TEMPLATES[llm]})")
    tokenizer = build_tokenizer(template)
    sizes = LLM_SIZES[llm]
    raw = {
        "architectures": [FAMILY_TO_ARCH[llm]],
        "model_type": MODEL_TYPES[llm],
        **sizes,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 8192,
        "hidden_act": sizes.get("hidden_act", "silu"),
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
        "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
        "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": CLIP_TINY["hidden_size"],
        "mm_hidden_size_aux": sum(CONVNEXT_TINY["dims"]),
        "mm_projector_type": "mlp2x_gelu",
        "mm_projector_lr": None,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "image_size_aux": 1536 if hd else 768,
        "image_grid": 2 if hd else 1,
        "image_global": hd,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "optimize_vision_tower": False,
        "optimize_vision_tower_aux": False,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 4096 if hd else 2048,
        "mm_vision_tower_config": CLIP_TINY,
        "mm_vision_tower_aux_config": CONVNEXT_TINY,
    }
    if vision == "real":  # no tower blocks: MGMConfig's defaults are the real towers
        del raw["mm_vision_tower_config"], raw["mm_vision_tower_aux_config"]
        raw.update(mm_hidden_size=CLIP_VIT_L_336["hidden_size"], mm_hidden_size_aux=sum(CONVNEXT_LARGE["dims"]))
    return raw, tokenizer


def _bf16_exact(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give norms and layer scales non-trivial values (so every path matters), then round to bf16."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim == 1 and (
                "norm" in name
                or "layrnorm" in name
                or "layernorm" in name
                or name.split(".")[-2] in {"0"}
                and "projector" in name
            ):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            p.copy_(p.to(torch.bfloat16).float())


def build_tiny(llm: str = "llama", hd: bool = False, seed: int = 0, template: str | None = None, vision: str = "tiny"):
    """In-memory (config dict, tokenizer, MGMConfig, vision encoder, LLM), fp32 with bf16-exact weights."""
    raw, tokenizer = tiny_config_dict(llm, hd, template, vision)
    config = MGMConfig.from_dict(raw)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = MGMVisionEncoder(config).eval()
    model = AutoModelForCausalLM.from_config(config.llm_config, dtype=torch.float32).eval()
    _bf16_exact(encoder, generator)
    _bf16_exact(model, generator)
    return raw, tokenizer, config, encoder, model


def official_state_dict(vision: MGMVisionEncoder, llm) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in llm.state_dict().items()}
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    state.update(
        {vision_to_official_key(k): v for k, v in vision.state_dict().items() if not k.endswith("position_ids")}
    )
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def save_sharded(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    keys = list(state)
    if shards <= 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoint(
    out_dir: str | Path,
    llm: str = "llama",
    hd: bool = False,
    seed: int = 0,
    template: str | None = None,
    shards: int = 2,
    vision: str = "tiny",
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw, tokenizer, _, encoder, model = build_tiny(llm, hd, seed, template, vision)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    save_sharded(official_state_dict(encoder, model), out, shards)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", choices=sorted(LLM_SIZES), default="llama")
    parser.add_argument("--hd", action="store_true", help="HD variant (672 LR as 2x2 crops + global, 1536 HR)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--template",
        choices=sorted(TEMPLATES),
        default=None,
        help="chat template whose special tokens the tokenizer carries (default: the family's)",
    )
    parser.add_argument("--shards", type=int, default=2, help="number of safetensors shards (1 = model.safetensors)")
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(args.out, args.llm, args.hd, args.seed, args.template, args.shards)
    print(f"wrote tiny {args.llm}{' HD' if args.hd else ''} MGM checkpoint to {path}")


if __name__ == "__main__":
    main()
