"""SDPA attention with native grouped-query attention under a padding mask, as an HF attention backend.

transformers 4.57's "sdpa" backend passes `enable_gqa=True` to torch only when there is no attention
mask; with a mask (every decode step of a left-padded batch) it first expands K/V to all query heads
(`repeat_kv`), i.e. copies the whole KV cache n_rep times per layer per step: Gemma-2B (MQA, n_rep 8),
Mixtral and LLaMA-3 (n_rep 4). On CPU that copy costs more than the attention itself (a 150M-parameter
GQA model spent a third of a batch-4 decode step in it). This backend is identical to "sdpa" except
that it always lets torch (>= 2.5) handle the head groups. Masks are built exactly as for "sdpa".
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_native_gqa"

_TORCH_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def sdpa_native_gqa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    extra = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, **extra
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the backend (idempotent); returns its name for `model.set_attn_implementation`."""
    AttentionInterface.register(NAME, sdpa_native_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def wants_native_gqa(llm, device: torch.device) -> bool:
    """True for an sdpa model with grouped K/V heads on CPU, with a torch that has enable_gqa."""
    cfg = llm.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return (
        _TORCH_HAS_GQA
        and device.type == "cpu"
        and getattr(cfg, "_attn_implementation", None) == "sdpa"
        and heads is not None
        and kv_heads < heads
    )


def use_native_gqa(llm, device: torch.device) -> bool:
    """Switch `llm` to this backend when `wants_native_gqa`; returns whether it did. The caller owns
    the model and its backend (the engine never switches it)."""
    if not wants_native_gqa(llm, torch.device(device)):
        return False
    llm.set_attn_implementation(register())
    return True
