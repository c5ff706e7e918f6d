"""Load a local MGM checkpoint folder: config.json, safetensors shards (+ index), tokenizer.

Everything comes from the MGM shards, towers included (they are saved there); when the tower weights
are absent, CLIP comes from an HF CLIP folder (`clip_dir`) and ConvNeXt from an OpenCLIP folder
(`convnext_dir`, `open_clip_model.safetensors`). Missing or unexpected keys are an error that names
them: never a silent random init. Only safetensors are read (no pickle).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_utils import no_init_weights

from mgm_ref.config import MGMConfig
from mgm_ref.conversation import default_conv_mode
from mgm_ref.errors import CheckpointError
from mgm_ref.model import MGM
from mgm_ref.vision import MGMVisionEncoder

VISION_PREFIXES = ("model.vision_tower.", "model.vision_tower_aux.", "model.vlm_uni_", "model.mm_projector.")
CLIP_PREFIX = "model.vision_tower.vision_tower."
CONVNEXT_PREFIX = "model.vision_tower_aux."

# official (timm) ConvNeXt names <-> transformers ConvNeXt blocks used by mgm_ref.vision.ConvNextTower;
# {s} is a stage index, {b} a block index. One table serves both directions.
_CONVNEXT_NAMES = [
    ("vision_stem.0.", "stem.patch_embeddings."),
    ("vision_stem.1.", "stem.layernorm."),
    ("vision_stages.{s}.downsample.", "stages.{s}.downsampling_layer."),
    ("vision_stages.{s}.blocks.{b}.conv_dw.", "stages.{s}.layers.{b}.dwconv."),
    ("vision_stages.{s}.blocks.{b}.norm.", "stages.{s}.layers.{b}.layernorm."),
    ("vision_stages.{s}.blocks.{b}.mlp.fc1.", "stages.{s}.layers.{b}.pwconv1."),
    ("vision_stages.{s}.blocks.{b}.mlp.fc2.", "stages.{s}.layers.{b}.pwconv2."),
    ("vision_stages.{s}.blocks.{b}.gamma", "stages.{s}.layers.{b}.layer_scale_parameter"),
]


def _rules(reverse: bool) -> list[tuple[str, str]]:
    rules = []
    for official, ours in _CONVNEXT_NAMES:
        src, dst = (ours, official) if reverse else (official, ours)
        pattern = "^" + re.escape(src).replace(r"\{s\}", r"(\d+)").replace(r"\{b\}", r"(\d+)")
        rules.append((pattern if src.endswith(".") else pattern + "$", dst.replace("{s}", r"\1").replace("{b}", r"\2")))
    return rules


_CONVNEXT_RENAMES, _CONVNEXT_RENAMES_BACK = _rules(reverse=False), _rules(reverse=True)


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def official_to_vision_key(key: str) -> str:
    """Official MGM key (model.vision_tower_aux.vision_stem.0.weight, ...) -> MGMVisionEncoder key."""
    key = key.removeprefix("model.")
    if key.startswith("vision_tower_aux."):
        return "vision_tower_aux." + _rename(key.removeprefix("vision_tower_aux."), _CONVNEXT_RENAMES)
    return key


def vision_to_official_key(key: str) -> str:
    if key.startswith("vision_tower_aux."):
        key = "vision_tower_aux." + _rename(key.removeprefix("vision_tower_aux."), _CONVNEXT_RENAMES_BACK)
    return "model." + key


# ---- reading shards ------------------------------------------------------------------------------
class ShardedCheckpoint:
    """Key -> file map over `model.safetensors.index.json` or a single `model.safetensors`."""

    def __init__(self, folder: str | Path, single_name: str = "model.safetensors"):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.folder / f for k, f in weight_map.items()}
        elif (self.folder / single_name).is_file():
            path = self.folder / single_name
            with safe_open(path, "pt") as f:
                self.files = {k: path for k in f.keys()}
        else:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (found {bins}: pickle checkpoints are not loaded; convert them to safetensors)" if bins else ""
            raise CheckpointError(f"{self.folder}: no {single_name} or model.safetensors.index.json{hint}")
        for path in set(self.files.values()):
            if not path.is_file():
                raise CheckpointError(f"{self.folder}: shard {path.name} listed in the index is missing")

    def keys(self) -> list[str]:
        return list(self.files)

    def load(self, keys) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for path, file_keys in by_file.items():
            try:
                with safe_open(path, "pt") as f:
                    for k in file_keys:
                        out[k] = f.get_tensor(k)
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
        return out


def _strict_load(module: torch.nn.Module, state: dict, what: str, optional_missing=()) -> None:
    expected = set(module.state_dict())
    missing = sorted(expected - set(state) - set(optional_missing))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:

        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = [
            f"missing keys: {show(missing)}" if missing else "",
            f"unexpected keys: {show(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(f"{what}: " + "; ".join(p for p in parts if p))
    try:
        module.load_state_dict(state, strict=False, assign=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"{what}: weight shapes do not match the architecture in config.json ({str(e).splitlines()[-1].strip()}). "
            "If the towers are not the real CLIP ViT-L/14-336 and ConvNeXt-L, describe them with "
            "mm_vision_tower_config / mm_vision_tower_aux_config."
        ) from None


# ---- public API ----------------------------------------------------------------------------------
def load_tokenizer(model_dir: str | Path):
    folder = Path(model_dir)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer.model)")
    # The original loads the slow (sentencepiece) tokenizer when there is one.
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=not (folder / "tokenizer.model").is_file())
    return tokenizer


def load_vision(
    model_dir: str | Path,
    dtype=torch.float32,
    device="cpu",
    config: MGMConfig | None = None,
    clip_dir: str | Path | None = None,
    convnext_dir: str | Path | None = None,
    checkpoint: ShardedCheckpoint | None = None,
) -> MGMVisionEncoder:
    config = config or MGMConfig.from_model_dir(model_dir)
    ckpt = checkpoint or ShardedCheckpoint(model_dir)
    official = {k for k in ckpt.keys() if k.startswith(VISION_PREFIXES)}
    state = {official_to_vision_key(k): v for k, v in ckpt.load(official).items()}
    if not any(k.startswith(CLIP_PREFIX) for k in official):
        state.update(_clip_from_folder(clip_dir, model_dir))
    if not any(k.startswith(CONVNEXT_PREFIX) for k in official):
        state.update(_convnext_from_folder(convnext_dir, model_dir))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # buffer, not a weight
    with no_init_weights():
        encoder = MGMVisionEncoder(config)
    _strict_load(encoder, state, f"{model_dir} (vision)")
    return encoder.to(device=device, dtype=dtype).eval()


def _clip_from_folder(clip_dir, model_dir) -> dict:
    if clip_dir is None:
        raise CheckpointError(f"{model_dir}: the checkpoint holds no CLIP weights; pass the CLIP folder (clip_dir)")
    ckpt = ShardedCheckpoint(clip_dir)
    keys = [k for k in ckpt.keys() if k.startswith("vision_model.")]
    if not keys:
        raise CheckpointError(f"{clip_dir}: no vision_model.* keys (expected an HF CLIP checkpoint)")
    return {"vision_tower.vision_tower." + k: v for k, v in ckpt.load(keys).items()}


def _convnext_from_folder(convnext_dir, model_dir) -> dict:
    if convnext_dir is None:
        raise CheckpointError(
            f"{model_dir}: the checkpoint holds no ConvNeXt weights; pass the OpenCLIP ConvNeXt folder (convnext_dir)"
        )
    ckpt = ShardedCheckpoint(convnext_dir, single_name="open_clip_model.safetensors")
    mapping = {"visual.trunk.stem.": "vision_stem.", "visual.trunk.stages.": "vision_stages."}
    out = {}
    for key, value in ckpt.load([k for k in ckpt.keys() if k.startswith(tuple(mapping))]).items():
        prefix = next(p for p in mapping if key.startswith(p))
        out[official_to_vision_key(CONVNEXT_PREFIX + mapping[prefix] + key.removeprefix(prefix))] = value
    if not out:
        raise CheckpointError(f"{convnext_dir}: no visual.trunk.* keys (expected an OpenCLIP ConvNeXt checkpoint)")
    return out


def load_llm(
    model_dir: str | Path,
    dtype=torch.float32,
    device="cpu",
    config: MGMConfig | None = None,
    checkpoint: ShardedCheckpoint | None = None,
):
    """(HF causal LM with only the LLM weights, tokenizer, MGMConfig)."""
    config = config or MGMConfig.from_model_dir(model_dir)
    ckpt = checkpoint or ShardedCheckpoint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the LLM vocabulary is {config.vocab_size}"
        )
    keys = [k for k in ckpt.keys() if not k.startswith(VISION_PREFIXES)]
    with no_init_weights():
        llm = AutoModelForCausalLM.from_config(config.llm_config, dtype=dtype)
    tied = getattr(config.llm_config, "tie_word_embeddings", False)
    _strict_load(llm, ckpt.load(keys), f"{model_dir} (LLM)", optional_missing=("lm_head.weight",) if tied else ())
    if tied:
        llm.tie_weights()
    return llm.to(device).eval(), tokenizer, config


def load_model(
    model_dir: str | Path,
    dtype=torch.float32,
    device="cpu",
    conv_mode: str | None = None,
    clip_dir=None,
    convnext_dir=None,
) -> MGM:
    config = MGMConfig.from_model_dir(model_dir)
    ckpt = ShardedCheckpoint(model_dir)
    llm, tokenizer, _ = load_llm(model_dir, dtype, device, config, ckpt)
    vision = load_vision(model_dir, dtype, device, config, clip_dir, convnext_dir, ckpt)
    return MGM(config, vision, llm, tokenizer, conv_mode or default_conv_mode(config.family, tokenizer))
