"""Read a TensorRT-LLM checkpoint back into PyTorch, without TensorRT-LLM.

A checkpoint written by ModelOpt is `config.json` + `rank{i}.safetensors` (rank = tp_rank + pp_rank * tp_size,
layers renumbered from 0 on every pipeline stage). This module undoes that, so tests (and anyone debugging a
build) can check what an engine will be fed:

- `dequantize_rank`: FP8 / INT8-SQ / INT4-AWQ weights -> float, keeping the activation and pre-quant scales;
- `merge_ranks`: tp x pp shards -> one tp=1, pp=1 tensor dict (q/k/v regrouped, replicated KV heads deduplicated);
- `to_hf_state_dict` / `build_hf_model`: TensorRT-LLM names -> the transformers Llama/Gemma/Mixtral layout;
- `add_activation_quant_hooks`: emulate the engine's activation quantization (per-tensor FP8 / INT8 with the
  exported scales, after the SmoothQuant/AWQ pre-quant scale) on the rebuilt HF model;
- `prompt_table_embeddings`: what the engine's embedding layer does with fake ids >= vocab_size.

Naming (TensorRT-LLM `GatedMLP`: proj(act(fc(x)) * gate(x))): qkv = cat(q, k, v), dense = o_proj,
mlp.fc = gate_proj, mlp.gate = up_proj, mlp.proj = down_proj; MoE: mlp.fc[e] = cat(w3, w1), mlp.proj[e] = w2,
mlp.router = block_sparse_moe.gate. Gemma's RMSNorm weight is exported as (1 + w), as TensorRT-LLM's
RmsNorm multiplies by the weight directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from mgm_ref.errors import CheckpointError

FP8_MAX = 448.0
COLUMN = ("attention.qkv", "mlp.fc", "mlp.gate")  # output features split across tp ranks
ROW = ("attention.dense", "mlp.proj")  # input features split across tp ranks
_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


class CheckpointFormatError(CheckpointError):
    """The folder is not a TensorRT-LLM checkpoint this module understands."""


# ---- reading ---------------------------------------------------------------------------------
def read_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{ckpt_dir}: no config.json")
    return json.loads(path.read_text())


def world_size(config: dict) -> int:
    m = config["mapping"]
    return int(m.get("tp_size", 1)) * int(m.get("pp_size", 1))


def rank_files(ckpt_dir: str | Path, config: dict | None = None) -> list[Path]:
    config = config or read_config(ckpt_dir)
    files = [Path(ckpt_dir) / f"rank{r}.safetensors" for r in range(world_size(config))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointFormatError(f"{ckpt_dir}: missing {missing} for tp x pp = {world_size(config)}")
    return files


def load_ranks(ckpt_dir: str | Path, config: dict | None = None) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(f)) for f in rank_files(ckpt_dir, config)]


# ---- dequantization ----------------------------------------------------------------------------
def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., out/2, in) int8 bytes holding two signed nibbles along `out` -> (..., out, in) int8."""
    p = packed.view(torch.uint8).to(torch.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    both = torch.stack([lo, hi], dim=-2)  # (..., out/2, 2, in)
    both = torch.where(both >= 8, both - 16, both)
    shape = list(packed.shape)
    shape[-2] *= 2
    return both.reshape(shape).to(torch.int8)


def dequantize_weight(
    weight: torch.Tensor, scale: torch.Tensor | None, quant_algo: str | None, group_size: int | None = None
) -> torch.Tensor:
    """Exported (quantized) weight + weights_scaling_factor -> float32 weight in (…, out, in) layout."""
    if scale is None or weight.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return weight.float()
    scale = scale.float()
    if weight.dtype == torch.float8_e4m3fn:  # per-tensor (or per-expert) scale
        s = scale.reshape(scale.shape + (1,) * (weight.dim() - scale.dim())) if weight.dim() == 3 else scale
        return weight.float() * s
    if quant_algo and "AWQ" in quant_algo:  # packed int4, (…, out, in/group) scales
        q = unpack_int4(weight).float()
        expand = torch.arange(q.shape[-1]) // int(group_size)
        return q * scale[..., expand]
    if weight.dtype == torch.int8:  # INT8 SmoothQuant, per output channel
        return weight.float() * scale.reshape(scale.shape + (1,))
    raise CheckpointFormatError(f"cannot dequantize a {weight.dtype} weight for quant_algo={quant_algo}")


def dequantize_rank(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Float weights under the same names; `*.weights_scaling_factor` is consumed, other scales kept."""
    quant = config.get("quantization") or {}
    algo, group = quant.get("quant_algo"), quant.get("group_size")
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weights_scaling_factor"):
            continue
        if name.endswith(".weight"):
            scale = tensors.get(name[: -len("weight")] + "weights_scaling_factor")
            out[name] = dequantize_weight(t, scale, algo, group)
        else:
            out[name] = t.float() if t.is_floating_point() else t
    return out


# ---- tp/pp merge -------------------------------------------------------------------------------
def _qkv_sizes(config: dict, tp: int) -> tuple[int, int, int]:
    head = config["head_size"]
    q = config["num_attention_heads"] // tp * head
    kv = max(config["num_key_value_heads"] // tp, 1) * head
    return q, kv, kv


def _merge_qkv(parts: list[torch.Tensor], config: dict, tp: int) -> torch.Tensor:
    """Rank-wise [q_r; k_r; v_r] along dim 0 -> [q; k; v]; KV heads replicated over ranks are kept once."""
    q, k, v = _qkv_sizes(config, tp)
    kv_heads = config["num_key_value_heads"]
    kv_ranks = range(0, tp, max(tp // kv_heads, 1)) if tp > kv_heads else range(tp)
    qs = [p[:q] for p in parts]
    ks = [parts[r][q : q + k] for r in kv_ranks]
    vs = [parts[r][q + k : q + k + v] for r in kv_ranks]
    return torch.cat(qs + ks + vs, dim=0)


def _merge_tp(name: str, parts: list[torch.Tensor], config: dict) -> torch.Tensor:
    tp = len(parts)
    if tp == 1:
        return parts[0]
    first = parts[0]
    if name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        sharded = name == "lm_head.weight" or config.get("use_parallel_embedding", False)
        if not sharded:
            return first
        dim = config.get("embedding_sharding_dim", 0) if name != "lm_head.weight" else 0
        merged = torch.cat(parts, dim=dim)
        return merged.narrow(dim, 0, config["vocab_size"]) if dim == 0 else merged
    module, _, leaf = name.rpartition(".")
    short = module.split(".", 3)[-1] if module.startswith("transformer.layers.") else module
    if first.dim() == 0 or first.numel() == 1 or leaf in ("activation_scaling_factor",) or "cache_scaling" in leaf:
        return first  # per-tensor: the same on every rank
    if short == "attention.qkv":
        if leaf == "prequant_scaling_factor":
            return first
        return _merge_qkv(parts, config, tp)
    if short in ("mlp.fc", "mlp.gate"):
        if leaf == "prequant_scaling_factor":
            return first
        if config.get("moe") and short == "mlp.fc":  # (E, 2I/tp, H): [w3_r; w1_r] per rank
            halves = [p.chunk(2, dim=1) for p in parts]
            return torch.cat([torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1)], 1)
        return torch.cat(parts, dim=0)
    if short in ROW:  # weights and pre-quant scales: split on `in`
        return torch.cat(parts, dim=-1)
    if short == "mlp.router" or "layernorm" in short or name.startswith("transformer.ln_f."):
        return first
    raise CheckpointFormatError(f"no tp merge rule for {name}")


def merge_ranks(ranks: list[dict[str, torch.Tensor]], config: dict) -> dict[str, torch.Tensor]:
    """tp x pp rank dicts -> one dict with global layer numbers, as a tp=1, pp=1 export would hold."""
    m = config["mapping"]
    tp, pp = int(m.get("tp_size", 1)), int(m.get("pp_size", 1))
    if len(ranks) != tp * pp:
        raise CheckpointFormatError(f"{len(ranks)} rank files for tp={tp} x pp={pp}")
    layers_per_stage = config["num_hidden_layers"] // pp
    by_name: dict[str, list[torch.Tensor | None]] = {}
    for rank, tensors in enumerate(ranks):
        tp_rank, pp_rank = rank % tp, rank // tp
        for name, t in tensors.items():
            hit = _LAYER_RE.match(name)
            if hit:
                name = f"transformer.layers.{int(hit.group(1)) + pp_rank * layers_per_stage}.{hit.group(2)}"
            by_name.setdefault(name, [None] * tp)[tp_rank] = t
    merged = {}
    for name, parts in by_name.items():
        if any(p is None for p in parts):
            raise CheckpointFormatError(f"{name} is missing on some tensor-parallel ranks")
        merged[name] = _merge_tp(name, parts, config)
    return merged


def load_merged(ckpt_dir: str | Path, dequantize: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    config = read_config(ckpt_dir)
    ranks = load_ranks(ckpt_dir, config)
    if dequantize:
        ranks = [dequantize_rank(r, config) for r in ranks]
    return config, merge_ranks(ranks, config)


# ---- TensorRT-LLM names -> transformers names ----------------------------------------------------
def family_of(config: dict) -> str:
    arch = config.get("architecture", "")
    if "Mixtral" in arch or config.get("moe"):
        return "mixtral"
    if "Gemma" in arch or config.get("decoder") == "gemma":
        return "gemma"
    return "llama"


def to_hf_state_dict(merged: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Float TensorRT-LLM tensors (tp=1, pp=1) -> HF state dict; scales other than weights are dropped."""
    family = family_of(config)
    norm_offset = 1.0 if family == "gemma" else 0.0
    q, k, v = _qkv_sizes(config, 1)
    sd: dict[str, torch.Tensor] = {}
    vocab = config["vocab_size"]
    sd["model.embed_tokens.weight"] = merged["transformer.vocab_embedding.weight"]
    sd["model.norm.weight"] = merged["transformer.ln_f.weight"] - norm_offset
    if "lm_head.weight" in merged:
        sd["lm_head.weight"] = merged["lm_head.weight"][:vocab]
    for i in range(config["num_hidden_layers"]):
        src, dst = f"transformer.layers.{i}.", f"model.layers.{i}."
        sd[dst + "input_layernorm.weight"] = merged[src + "input_layernorm.weight"] - norm_offset
        sd[dst + "post_attention_layernorm.weight"] = merged[src + "post_layernorm.weight"] - norm_offset
        qkv = merged[src + "attention.qkv.weight"]
        sd[dst + "self_attn.q_proj.weight"] = qkv[:q]
        sd[dst + "self_attn.k_proj.weight"] = qkv[q : q + k]
        sd[dst + "self_attn.v_proj.weight"] = qkv[q + k : q + k + v]
        sd[dst + "self_attn.o_proj.weight"] = merged[src + "attention.dense.weight"]
        if family == "mixtral":
            moe = dst + "block_sparse_moe."
            sd[moe + "gate.weight"] = merged[src + "mlp.router.weight"]
            fc, proj = merged[src + "mlp.fc.weight"], merged[src + "mlp.proj.weight"]
            for e in range(fc.shape[0]):
                w3, w1 = fc[e].chunk(2, dim=0)
                sd[f"{moe}experts.{e}.w1.weight"] = w1
                sd[f"{moe}experts.{e}.w3.weight"] = w3
                sd[f"{moe}experts.{e}.w2.weight"] = proj[e]
        else:
            sd[dst + "mlp.gate_proj.weight"] = merged[src + "mlp.fc.weight"]
            sd[dst + "mlp.up_proj.weight"] = merged[src + "mlp.gate.weight"]
            sd[dst + "mlp.down_proj.weight"] = merged[src + "mlp.proj.weight"]
    return sd


def hf_linear_sources(config: dict) -> dict[str, tuple[str, int | None]]:
    """HF linear module name -> (TensorRT-LLM module prefix, expert index or None), for scale lookup."""
    family = family_of(config)
    out: dict[str, tuple[str, int | None]] = {}
    n_experts = (config.get("moe") or {}).get("num_experts", 0)
    for i in range(config["num_hidden_layers"]):
        src, dst = f"transformer.layers.{i}.", f"model.layers.{i}."
        for p in ("q_proj", "k_proj", "v_proj"):
            out[f"{dst}self_attn.{p}"] = (src + "attention.qkv", None)
        out[f"{dst}self_attn.o_proj"] = (src + "attention.dense", None)
        if family == "mixtral":
            for e in range(n_experts):
                base = f"{dst}block_sparse_moe.experts.{e}."
                out[base + "w1"] = (src + "mlp.fc", e)
                out[base + "w3"] = (src + "mlp.fc", e)
                out[base + "w2"] = (src + "mlp.proj", e)
        else:
            out[dst + "mlp.gate_proj"] = (src + "mlp.fc", None)
            out[dst + "mlp.up_proj"] = (src + "mlp.gate", None)
            out[dst + "mlp.down_proj"] = (src + "mlp.proj", None)
    return out


def build_hf_model(merged: dict[str, torch.Tensor], config: dict, hf_config, dtype=torch.float32):
    """A transformers model (from `hf_config`) holding the checkpoint's (dequantized) weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    sd = to_hf_state_dict(merged, config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointFormatError(f"checkpoint -> HF mismatch: missing {missing[:6]}, unexpected {unexpected[:6]}")
    if tied:
        model.tie_weights()
    return model


# ---- activation quantization emulation ----------------------------------------------------------
def fake_quant(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-tensor quantize -> dequantize with an exported scaling factor (real = code * scale)."""
    s = scale.to(torch.float32).reshape(())
    xf = x.float() / s
    if kind == "fp8":
        q = xf.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    elif kind == "int8":
        q = xf.round().clamp(-128, 127)
    else:
        raise ValueError(kind)
    return (q * s).to(x.dtype)


def activation_kind(config: dict) -> str | None:
    algo = (config.get("quantization") or {}).get("quant_algo") or ""
    if algo == "FP8":
        return "fp8"
    if algo.startswith("W8A8_SQ"):
        return "int8"
    return None


def add_activation_quant_hooks(model, merged: dict[str, torch.Tensor], config: dict) -> list:
    """Pre-hooks on every quantized linear: x -> Q(x * prequant) with the exported activation scale."""
    kind = activation_kind(config)
    handles = []
    modules = dict(model.named_modules())
    for hf_name, (src, expert) in hf_linear_sources(config).items():
        act = merged.get(src + ".activation_scaling_factor")
        pre = merged.get(src + ".prequant_scaling_factor")
        if act is None and pre is None:
            continue
        if pre is not None and expert is not None and pre.dim() == 2:
            pre = pre[expert]
        if act is not None and expert is not None and act.numel() > 1:
            act = act.reshape(-1)[expert]

        def hook(_module, args, act=act, pre=pre):
            x = args[0]
            if pre is not None:
                x = x * pre.to(x.dtype)
            if act is not None and kind is not None:
                x = fake_quant(x, act, kind)
            return (x,) + tuple(args[1:])

        handles.append(modules[hf_name].register_forward_pre_hook(hook))
    return handles


# ---- prompt table (multimodal) -------------------------------------------------------------------
def prompt_table_embeddings(
    input_ids: torch.Tensor, embedding: torch.Tensor, prompt_table: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """TensorRT-LLM `PromptTuningEmbedding`: ids < vocab_size look up the vocabulary, ids >= vocab_size
    take row (id - vocab_size) of the flattened [B*T, H] prompt table. (Gemma's sqrt(hidden) scale is applied
    afterwards by the model, to both kinds of rows.)"""
    from mgm_runtime.prompt_table import embed_with_prompt_table

    return embed_with_prompt_table(input_ids, embedding.__getitem__, prompt_table, vocab_size)
