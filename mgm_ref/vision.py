"""The vision side of MGM: LR CLIP tower, HR ConvNeXt tower, patch info mining, projector.

`MGMVisionEncoder.forward(images, images_aux) -> (B, T, H)` is the exact boundary of the vision
engine: pixels in, the rows that replace `<image>` in the LLM's input embeddings out.
Submodule names mirror the official state dict (keys are these names with a leading "model.").
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionModel, ConvNextConfig
from transformers.models.convnext.modeling_convnext import ConvNextEmbeddings, ConvNextStage

from mgm_ref.config import MGMConfig


class CLIPTower(nn.Module):
    """LR tower: `hidden_states[select_layer]` of CLIP (pre final LN), CLS dropped -> (B, 576, C)."""

    def __init__(self, config: MGMConfig):
        super().__init__()
        self.select_layer = config.select_layer
        self.vision_tower = CLIPVisionModel(config.clip_config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixels.to(self.vision_tower.dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]


class ConvNextTower(nn.Module):
    """HR tower: ConvNeXt trunk (stem + 4 stages, no head); the four stage outputs are upsampled to
    the stage-0 size and concatenated -> (B, sum(dims), S/4, S/4).

    Built from transformers' ConvNeXt blocks; the loader maps the official timm names
    (vision_stem.*, vision_stages.*) onto them. Drop path is 0: the original ran stochastic depth at
    inference by accident (MGM_SPEC §10.2); the reference is deterministic.
    """

    def __init__(self, config: MGMConfig):
        super().__init__()
        dims, depths = config.convnext_dims, config.convnext_depths
        hf = ConvNextConfig(
            hidden_sizes=dims,
            depths=depths,
            num_channels=3,
            patch_size=4,
            hidden_act="gelu",
            drop_path_rate=0.0,
            layer_scale_init_value=1e-6,
        )
        self.stem = ConvNextEmbeddings(hf)
        self.stages = nn.ModuleList(
            ConvNextStage(
                hf, in_channels=dims[max(i - 1, 0)], out_channels=dims[i], stride=2 if i > 0 else 1, depth=depths[i]
            )
            for i in range(4)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.stage_maps(pixels), dim=1)

    def stage_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's (B, C_i, S/4, S/4) output, upsampled to the first stage's size."""
        x = self.stem(pixels.to(self.stem.patch_embeddings.weight.dtype))
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        size = outputs[0].shape[-2:]
        # The original upsamples in float32 and casts back.
        return [F.interpolate(o.float(), size=size, mode="bilinear", align_corners=False).to(o.dtype) for o in outputs]


def ln_linear(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))


def window_hr_features(hr: torch.Tensor, grid_side: int) -> torch.Tensor:
    """(B, C, Hf, Wf) -> (B, P*P, M*M, C): the M x M HR pixels under each of the P x P LR tokens."""
    b, c, hf, wf = hr.shape
    m = hf // grid_side
    x = hr.permute(0, 2, 3, 1).reshape(b, grid_side, m, grid_side, m, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, grid_side * grid_side, m * m, c)


class MGMVisionEncoder(nn.Module):
    def __init__(self, config: MGMConfig):
        super().__init__()
        self.config = config
        c_lr, c_hr, hidden = config.mm_hidden_size, config.mm_hidden_size_aux, config.hidden_size
        self.vision_tower = CLIPTower(config)
        self.vision_tower_aux = ConvNextTower(config)
        self.vlm_uni_query_projector = ln_linear(c_lr, c_lr)
        self.vlm_uni_aux_projector = ln_linear(c_hr, c_lr)
        self.vlm_uni_val_projector = ln_linear(c_hr, c_lr)
        self.mm_projector = nn.Sequential(nn.Linear(c_lr, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    def mine(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Patch info mining: each LR token attends over its window of HR pixels; T = X_L + mined."""
        grid_side = int(lr.shape[1] ** 0.5)
        windows = window_hr_features(hr, grid_side)
        query = self.vlm_uni_query_projector(lr)
        key = self.vlm_uni_aux_projector(windows)
        value = self.vlm_uni_val_projector(windows)
        # Same operation order as the original: keys are scaled before the product.
        logits = query[:, :, None] @ (key.transpose(-1, -2) / key.shape[-1] ** 0.5)
        mined = (logits.nan_to_num().softmax(-1) @ value).mean(2)
        return lr + mined

    def forward(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        hr = self.vision_tower_aux(images_aux)
        if not cfg.hd:
            tokens = self.mine(self.vision_tower(images), hr.to(self.dtype))
            return self.mm_projector(tokens)

        b, g = images.shape[0], cfg.image_grid
        n_crops = g * g
        # CLIP runs on [all crops (image-major, TL,TR,BL,BR) ; all globals] as in the original.
        lr = self.vision_tower(torch.cat([images[:, :n_crops].flatten(0, 1), images[:, n_crops]]))
        lr_crops, lr_global = lr[: b * n_crops], lr[b * n_crops :]
        hr = hr.to(self.dtype)
        # Global view mines a half-resolution copy of the HR *feature map* (the tower is not re-run).
        hr_global = F.interpolate(hr.float(), scale_factor=1 / g, mode="bilinear", align_corners=False).to(hr.dtype)
        c, side = hr.shape[1], hr.shape[-1] // g
        hr_crops = hr.reshape(b, c, g, side, g, side).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        crops = self.mine(lr_crops, hr_crops).reshape(b, n_crops * lr.shape[1], -1)
        tokens = torch.cat([self.mine(lr_global, hr_global), crops], dim=1)  # global first
        return self.mm_projector(tokens)
