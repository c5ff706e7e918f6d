"""Batched next-token selection with per-row sampling parameters and per-row random generators.

One call handles a whole decode batch: greedy rows take the argmax, sampled rows go through
temperature -> top-k -> top-p (the order of HF's logits warpers) and draw their token by inverse CDF
with ONE uniform number from the row's own `torch.Generator`. A row's draw therefore depends only on its
own logits and its own generator, never on its batch mates. No Python loop touches the vocabulary; the
only per-row Python work is drawing that one uniform number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mgm_runtime.numerics import GREEDY_TEMPERATURE


@dataclass
class RowSampling:
    """Sampling parameters of one request (one batch row)."""

    temperature: float = 0.0
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def sample_next(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """(B, V) logits -> (B,) long token ids, row b sampled with rows[b]'s parameters."""
    if logits.ndim != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be (B, V) with B = {len(rows)} rows, got {tuple(logits.shape)}")
    out = logits.argmax(dim=-1)
    sampled = [b for b, r in enumerate(rows) if not r.greedy]
    if not sampled:
        return out
    picked = _sample_rows(logits[sampled].float(), [rows[b] for b in sampled])
    out[torch.tensor(sampled, device=out.device)] = picked
    return out


def _sample_rows(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Sample every row; rows are grouped by the code path they need so that a row's result never
    depends on which batch mates it has (plain softmax, top-k candidates, full sort for top-p only)."""
    dev = logits.device
    temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=dev)
    logits = logits / temps[:, None]
    # One uniform per row from the row's own generator.
    u = torch.stack(
        [
            torch.rand((), generator=r.generator, device=r.generator.device if r.generator is not None else "cpu").to(
                dev
            )
            for r in rows
        ]
    )
    vocab = logits.shape[1]
    groups: dict[str, list[int]] = {"plain": [], "top_k": [], "sort": []}
    for i, r in enumerate(rows):
        if 0 < r.top_k < vocab:
            groups["top_k"].append(i)
        elif r.top_p < 1.0:
            groups["sort"].append(i)
        else:
            groups["plain"].append(i)
    out = torch.empty(len(rows), dtype=torch.long, device=dev)
    for kind, members in groups.items():
        if not members:
            continue
        idx = torch.tensor(members, device=dev)
        sub, sub_u = logits[idx], u[idx]
        if kind == "plain":
            out[idx] = _inverse_cdf(torch.softmax(sub, dim=-1), sub_u)
            continue
        sub_rows = [rows[i] for i in members]
        if kind == "top_k":
            width = max(r.top_k for r in sub_rows)
            cand_logits, cand_idx = torch.topk(sub, width, dim=-1, sorted=True)
            k = torch.tensor([r.top_k for r in sub_rows], device=dev)
            ranks = torch.arange(width, device=dev)
            cand_logits = cand_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
        else:
            cand_logits, cand_idx = torch.sort(sub, dim=-1, descending=True)
        probs = torch.softmax(cand_logits, dim=-1)
        p = torch.tensor([r.top_p for r in sub_rows], dtype=torch.float32, device=dev)[:, None]
        # HF TopP: drop a token when the mass of the strictly more likely tokens already reaches top_p
        # (the most likely token is always kept); rows with top_p == 1 are untouched.
        drop = ((probs.cumsum(dim=-1) - probs) >= p) & (p < 1.0)
        drop[:, 0] = False
        choice = _inverse_cdf(probs.masked_fill(drop, 0.0), sub_u)
        out[idx] = cand_idx.gather(1, choice[:, None]).squeeze(1)
    return out


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i] per row (unnormalised probs; zero-probability entries never win)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    # u < 1, but u * total can round up to total: stay strictly below it so a token with mass wins
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total))).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[1] - 1)
