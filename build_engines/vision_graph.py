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

Non-finite values: for finite inputs a logit is non-finite only by overflow; otherwise it comes from
a non-finite n_ij (then that window's value sum is non-finite in both forms) or q_i (then so is the
residual X_L), so the output's non-finite entries are the reference's. nan_to_num stays on the
logits, as in the reference, so a NaN logit weighs as 0 in both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgm_ref.vision import MGMVisionEncoder, ln_linear


class ReassociatedMining(nn.Module):
    """Patch info mining in the re-associated form, over the reference's own projector modules.

    `forward(lr, hr)` takes the HR map channels-first like the reference; `mine_nhwc(lr, hr)` takes it
    channels-last, which the graph uses: LayerNorm runs over the last axis and the windows are read
    in place through reshapes, so the HR map is never reordered into windows.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.query = encoder.vlm_uni_query_projector  # (LayerNorm, Linear): applied as in the reference
        self.key_norm, self.key = encoder.vlm_uni_aux_projector
        self.value_norm, self.value = encoder.vlm_uni_val_projector
        # The reference divides by sqrt(key dim): the key Linear's output width.
        self.scale = float(self.key.out_features) ** 0.5

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.mine_nhwc(lr, hr.permute(0, 2, 3, 1))

    def mine_nhwc(self, lr: torch.Tensor, hr: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """lr (B, Ph*Pw, D) tokens of a Ph x Pw grid (square unless `grid` says), hr (B, Ph*M, Pw*M, C)."""
        b, h, w, c = hr.shape
        ph, pw = grid or (int(lr.shape[1] ** 0.5),) * 2
        m = h // ph
        shape = tuple(self.key_norm.normalized_shape)  # static, so traced exports keep it a constant
        normed_k = F.layer_norm(hr, shape, eps=self.key_norm.eps)
        normed_v = (
            normed_k if self.value_norm.eps == self.key_norm.eps else F.layer_norm(hr, shape, eps=self.value_norm.eps)
        )

        query = self.query(lr)  # (B, N, D)
        # (g_k * W_k^T q_i) / s per token, laid out like the windows: (B, Ph, 1, Pw, C, 1)
        probe = (query @ self.key.weight) * (self.key_norm.weight / self.scale)
        probe = probe.reshape(b, ph, 1, pw, c, 1)
        # pixel (y, x) of window (p, q) is hr[:, p*M + y, q*M + x]: windows read in place
        windows_k = normed_k.reshape(b, ph, m, pw, m, c)
        logits = (windows_k @ probe).reshape(b, ph, m, pw, m)  # (B, Ph, M_y, Pw, M_x)
        logits = logits.permute(0, 1, 3, 2, 4).reshape(b, ph * pw, m * m)
        weights = logits.nan_to_num().softmax(-1)
        weights = weights.reshape(b, ph, pw, m, m).permute(0, 1, 3, 2, 4).reshape(b, ph, m, pw, 1, m)
        # sum_j a_ij n_ij: over x by the product, then over y
        pooled = (weights @ normed_v.reshape(b, ph, m, pw, m, c)).sum(2).reshape(b, ph * pw, c)
        mined = self.value(pooled * self.value_norm.weight + self.value_norm.bias)
        return lr + mined


def channels_last_concat(maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, C_k, H, W) maps -> (B, H, W, sum C_k): the HR map as mining reads it."""
    return torch.cat([m.permute(0, 2, 3, 1) for m in maps], dim=-1)


def half_size(hr: torch.Tensor) -> torch.Tensor:
    """Bilinear x1/2 (align_corners=False) of a channels-first map, in float32 like the reference:
    at exactly half size every output pixel sits midway between two input pixels on each axis, so
    bilinear is the mean of each 2 x 2 block, a 2 x 2 average pool (a fast pooling kernel on the
    contiguous spatial axes; the same mean over a channels-last map is a strided reduction, 5x slower)."""
    return F.avg_pool2d(hr.float(), 2).to(hr.dtype)


class MGMVisionGraph(nn.Module):
    """The vision engine's exact I/O boundary: preprocessed LR + HR pixels -> LLM-ready image rows.

    Runs the reference encoder's towers and projector (the same modules) and its mining
    re-associated on a channels-last HR map; the view handling (normal, HD crops + global) gives
    what `MGMVisionEncoder.forward` gives.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.config = encoder.config
        self.vision_tower = encoder.vision_tower
        self.vision_tower_aux = encoder.vision_tower_aux
        self.mm_projector = encoder.mm_projector
        self.mine = ReassociatedMining(encoder)
        if self.config.hd and self.config.image_grid != 2:
            raise ValueError(f"image_grid {self.config.image_grid}: the HD graph handles the 2 x 2 grid only")

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    def forward(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # ConvNeXt's stage outputs, each upsampled as the reference does (channels-first)
        maps = self.vision_tower_aux.stage_maps(images_aux)
        hr = channels_last_concat(maps).to(self.dtype)  # (B, Hf, Wf, C)
        if not cfg.hd:
            return self.mm_projector(self.mine.mine_nhwc(self.vision_tower(images), hr))

        b, g = images.shape[0], cfg.image_grid
        n_crops = g * g
        lr = self.vision_tower(torch.cat([images[:, :n_crops].flatten(0, 1), images[:, n_crops]]))
        n, d = lr.shape[1], lr.shape[2]
        p = int(n**0.5)
        lr_crops, lr_global = lr[: b * n_crops], lr[b * n_crops :]
        # The crops' windows are the full map's windows: mine all crops at once on a (g*P) x (g*P)
        # token grid over the whole map, then put the tokens back in crop order (TL, TR, BL, BR).
        grid_tokens = lr_crops.reshape(b, g, g, p, p, d).permute(0, 1, 3, 2, 4, 5).reshape(b, n_crops * n, d)
        mined = self.mine.mine_nhwc(grid_tokens, hr, grid=(g * p, g * p))
        crops = mined.reshape(b, g, p, g, p, d).permute(0, 1, 3, 2, 4, 5).reshape(b, n_crops * n, d)
        # the global view mines the HR map at half size, the concat of the halved stage maps
        hr_global = channels_last_concat([half_size(m) for m in maps]).to(self.dtype)
        tokens = torch.cat([self.mine.mine_nhwc(lr_global, hr_global), crops], dim=1)  # global first
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
    for name, (i, o) in {
        "vlm_uni_query_projector": (c_lr, c_lr),
        "vlm_uni_aux_projector": (c_hr, c_lr),
        "vlm_uni_val_projector": (c_hr, c_lr),
    }.items():
        block = ln_linear(i, o)
        with torch.no_grad():
            block[0].weight.copy_(1 + 0.5 * torch.randn(i, generator=g))
            block[0].bias.copy_(0.5 * torch.randn(i, generator=g))
            block[1].weight.copy_(torch.randn(o, i, generator=g) / i**0.5)
            block[1].bias.copy_(0.5 * torch.randn(o, generator=g))
        setattr(holder, name, block)
    return holder.eval()
