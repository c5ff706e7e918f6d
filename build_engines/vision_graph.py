"""The vision engine's graph: mgm_ref's encoder with patch info mining re-associated.

`MGMVisionGraph(encoder)` computes what `mgm_ref.vision.MGMVisionEncoder.forward` computes, from the
same parameter tensors (shared, not copied), but mines without projecting the HR windows.

With n_ij = (h_ij - mean) / std (LayerNorm without its affine part) over the C HR channels of pixel j
in window i, and q_i the projected LR token, the reference computes

    logits_ij = q_i . (W_k (g_k * n_ij + b_k) + c_k) / s          s = sqrt(key dim)
    mined_i   = sum_j softmax_j(nan_to_num(logits_ij)) (W_v (g_v * n_ij + b_v) + c_v)

q_i . (W_k b_k + c_k) is the same for every j, and softmax is shift invariant, so the logits reduce to
((g_k * W_k^T q_i) . n_ij) / s: one (N, D) x (D, C) product per image instead of projecting all N*M^2
pixels. The softmax weights sum to one, so the value projection moves outside the sum:
mined_i = W_v (g_v * sum_j a_ij n_ij + b_v) + c_v, on N rows instead of N*M^2.

Non-finite values: a non-finite logit only arises from a non-finite q_i or n_ij, and then the token's
value sum (or its residual X_L) is non-finite in both forms, so the output's non-finite entries are
the reference's; nan_to_num is kept on the logits so finite-but-huge products saturate the same way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgm_ref.vision import MGMVisionEncoder, ln_linear, window_hr_features


class ReassociatedMining(nn.Module):
    """Patch info mining in the re-associated form, over the reference's own projector modules."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.query = encoder.vlm_uni_query_projector  # (LayerNorm, Linear): applied as in the reference
        self.key_norm, self.key = encoder.vlm_uni_aux_projector
        self.value_norm, self.value = encoder.vlm_uni_val_projector
        # The reference divides by sqrt(key dim): the key Linear's output width.
        self.scale = float(self.key.out_features) ** 0.5

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        grid_side = int(lr.shape[1] ** 0.5)
        windows = window_hr_features(hr, grid_side)  # (B, N, M*M, C)
        c = windows.shape[-1]
        normed_k = F.layer_norm(windows, (c,), eps=self.key_norm.eps)
        normed_v = normed_k if self.value_norm.eps == self.key_norm.eps else \
            F.layer_norm(windows, (c,), eps=self.value_norm.eps)

        query = self.query(lr)  # (B, N, D)
        # (g_k * W_k^T q_i) / s, per token: (B, N, C)
        probe = (query @ self.key.weight) * (self.key_norm.weight / self.scale)
        logits = (normed_k @ probe[..., None]).squeeze(-1)  # (B, N, M*M)
        weights = logits.nan_to_num().softmax(-1)
        pooled = (weights[:, :, None] @ normed_v).squeeze(2)  # (B, N, C): sum_j a_ij n_ij
        mined = self.value(pooled * self.value_norm.weight + self.value_norm.bias)
        return lr + mined


class MGMVisionGraph(nn.Module):
    """The vision engine's exact I/O boundary: preprocessed LR + HR pixels -> LLM-ready image rows.

    Runs the reference encoder's towers and projector unchanged and its mining re-associated; the
    view handling (normal, HD crops + global) follows `MGMVisionEncoder.forward` step for step.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.config = encoder.config
        self.vision_tower = encoder.vision_tower
        self.vision_tower_aux = encoder.vision_tower_aux
        self.mm_projector = encoder.mm_projector
        self.mine = ReassociatedMining(encoder)

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    def forward(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        hr = self.vision_tower_aux(images_aux).to(self.dtype)
        if not cfg.hd:
            return self.mm_projector(self.mine(self.vision_tower(images), hr))

        b, g = images.shape[0], cfg.image_grid
        n_crops = g * g
        lr = self.vision_tower(torch.cat([images[:, :n_crops].flatten(0, 1), images[:, n_crops]]))
        lr_crops, lr_global = lr[: b * n_crops], lr[b * n_crops:]
        hr_global = F.interpolate(hr.float(), scale_factor=1 / g, mode="bilinear", align_corners=False).to(hr.dtype)
        c, side = hr.shape[1], hr.shape[-1] // g
        hr_crops = hr.reshape(b, c, g, side, g, side).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        crops = self.mine(lr_crops, hr_crops).reshape(b, n_crops * lr.shape[1], -1)
        tokens = torch.cat([self.mine(lr_global, hr_global), crops], dim=1)  # global first
        return self.mm_projector(tokens)


class MiningOnly(nn.Module):
    """Patch info mining alone, (lr, hr) -> tokens, over an encoder's three projectors: the reference
    operation order (`reassociated=False`, `MGMVisionEncoder.mine` itself) or this module's form.
    Lets tests and benchmarks export, count and time the mining at real sizes without the towers."""

    def __init__(self, encoder: nn.Module, reassociated: bool = True):
        super().__init__()
        self.vlm_uni_query_projector = encoder.vlm_uni_query_projector
        self.vlm_uni_aux_projector = encoder.vlm_uni_aux_projector
        self.vlm_uni_val_projector = encoder.vlm_uni_val_projector
        self.reassociated = ReassociatedMining(self) if reassociated else None

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if self.reassociated is not None:
            return self.reassociated(lr, hr)
        return MGMVisionEncoder.mine(self, lr, hr)


def random_mining_projectors(c_lr: int, c_hr: int, seed: int = 0) -> nn.Module:
    """The three mining projectors with random weights *and* random LayerNorm affines/biases (the
    defaults, gamma 1 and beta 0, would hide mistakes in how the re-associated form uses them)."""
    g = torch.Generator().manual_seed(seed)
    holder = nn.Module()
    for name, (i, o) in {"vlm_uni_query_projector": (c_lr, c_lr), "vlm_uni_aux_projector": (c_hr, c_lr),
                         "vlm_uni_val_projector": (c_hr, c_lr)}.items():
        block = ln_linear(i, o)
        with torch.no_grad():
            block[0].weight.copy_(1 + 0.5 * torch.randn(i, generator=g))
            block[0].bias.copy_(0.5 * torch.randn(i, generator=g))
            block[1].weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
            block[1].bias.copy_(0.5 * torch.randn(o, generator=g))
        setattr(holder, name, block)
    return holder.eval()
