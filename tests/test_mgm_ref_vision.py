"""mgm_ref vision path: preprocessing, tower shapes, patch info mining, HD flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgm_ref.config import MGMConfig
from mgm_ref.constants import CLIP_MEAN, CLIP_STD
from mgm_ref.preprocess import PAD_COLOR, ImageProcessor, expand2square
from mgm_ref.tiny import tiny_config_dict
from mgm_ref.vision import MGMVisionEncoder, window_hr_features
from mgm_runtime.numerics import rel_l2
from tests.helpers.images import random_image


def tiny_config(llm="llama", hd=False) -> MGMConfig:
    return MGMConfig.from_dict(tiny_config_dict(llm, hd)[0])


def normalised(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD, strict=True)])


# ---- preprocessing -------------------------------------------------------------------------------
def test_pad_colour_is_clip_mean():
    assert PAD_COLOR == (122, 116, 104)
    padded = expand2square(Image.new("RGB", (40, 10), (255, 0, 0)))
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == PAD_COLOR and padded.getpixel((20, 20)) == (255, 0, 0)
    assert padded.getpixel((0, 14)) == PAD_COLOR and padded.getpixel((0, 15)) == (255, 0, 0)


def test_solid_image_gives_hand_computed_pixels():
    cfg = tiny_config()
    px = ImageProcessor(cfg)([Image.new("RGB", (64, 64), (200, 100, 50))])
    assert px.images_aux.shape == (1, 3, 768, 768) and px.images.shape == (1, 3, 336, 336)
    expected = normalised((200, 100, 50))
    for t in (px.images_aux, px.images):
        assert torch.allclose(t[0].mean((1, 2)), expected, atol=1e-6)
        assert float(t.std((2, 3)).max()) < 1e-5


def test_padded_rows_and_lr_derived_bilinear_from_hr():
    cfg = tiny_config()
    px = ImageProcessor(cfg)([Image.new("RGB", (768, 384), (255, 255, 255))])  # wide: pad top and bottom
    aux = px.images_aux[0]
    assert torch.allclose(aux[:, 0, 0], normalised(PAD_COLOR), atol=1e-6)
    assert torch.allclose(aux[:, 384, 384], normalised((255, 255, 255)), atol=1e-6)
    lr = F.interpolate(px.images_aux, size=(336, 336), mode="bilinear", align_corners=False)
    assert torch.equal(px.images, lr)  # derived from the normalised HR tensor, no antialias


def test_hd_crop_order_tl_tr_bl_br_then_global():
    cfg = tiny_config(hd=True)
    proc = ImageProcessor(cfg)
    aux = torch.zeros(1, 3, 1536, 1536)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # quadrant k gets value k+1
        aux[:, :, r * 768 : (r + 1) * 768, c * 768 : (c + 1) * 768] = k + 1
    views = proc.lr_views(aux)
    assert views.shape == (1, 5, 3, 336, 336)
    for k in range(4):
        assert torch.allclose(views[0, k], torch.full((3, 336, 336), k + 1.0)), f"crop {k}"
    glob = F.interpolate(
        F.interpolate(aux, size=(672, 672), mode="bilinear", align_corners=False),
        size=(336, 336),
        mode="bilinear",
        align_corners=False,
    )
    assert torch.equal(views[0, 4], glob[0])


def test_non_rgb_and_extreme_aspect_images_are_processed():
    proc = ImageProcessor(tiny_config())
    images = [
        Image.new("RGBA", (50, 40), (10, 20, 30, 0)),
        Image.new("L", (30, 30), 128),
        Image.new("P", (20, 25)),
        Image.new("CMYK", (33, 20), (0, 0, 0, 0)),
        Image.new("RGB", (3000, 2), (255, 0, 0)),
        Image.new("RGB", (1, 1500), (0, 255, 0)),
    ]
    px = proc(images)
    assert px.images_aux.shape == (6, 3, 768, 768)
    assert torch.isfinite(px.images_aux).all()


# ---- towers, mining, projector -------------------------------------------------------------------
@pytest.mark.parametrize("llm,hd", [("llama", False), ("gemma", False), ("llama", True)])
def test_shapes(llm, hd):
    cfg = tiny_config(llm, hd)
    enc = MGMVisionEncoder(cfg).eval()
    b = 2
    s = cfg.image_size_aux
    images = torch.randn(b, 5, 3, 336, 336) if hd else torch.randn(b, 3, 336, 336)
    aux = torch.randn(b, 3, s, s)
    with torch.no_grad():
        clip = enc.vision_tower(images.flatten(0, 1) if hd else images)
        hr = enc.vision_tower_aux(aux)
        out = enc(images, aux)
    assert clip.shape == (b * (5 if hd else 1), 576, cfg.mm_hidden_size)
    assert hr.shape == (b, cfg.mm_hidden_size_aux, s // 4, s // 4)
    grid_hr = hr if not hd else hr[:, :, :192, :192]
    assert window_hr_features(grid_hr, 24).shape == (b, 576, 64, cfg.mm_hidden_size_aux)
    assert out.shape == (b, 2880 if hd else 576, cfg.hidden_size)


def mine_by_loops(enc: MGMVisionEncoder, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Straightforward patch info mining: explicit loop over every LR token and its 8x8 window."""
    b, n, c = lr.shape
    p = int(math.isqrt(n))
    m = hr.shape[-1] // p
    out = torch.empty_like(lr)
    for bi in range(b):
        for row in range(p):
            for col in range(p):
                tok = row * p + col
                window = hr[bi, :, row * m : (row + 1) * m, col * m : (col + 1) * m]  # (C, m, m)
                pixels = window.reshape(hr.shape[1], m * m).T  # row-major pixels
                q = enc.vlm_uni_query_projector(lr[bi, tok])
                k = enc.vlm_uni_aux_projector(pixels)
                v = enc.vlm_uni_val_projector(pixels)
                att = torch.softmax((k @ q) / math.sqrt(k.shape[-1]), dim=0)
                out[bi, tok] = lr[bi, tok] + att @ v
    return out


def test_mining_matches_explicit_loop():
    cfg = tiny_config()
    enc = MGMVisionEncoder(cfg).eval()
    torch.manual_seed(1)
    for mod in (enc.vlm_uni_query_projector, enc.vlm_uni_aux_projector, enc.vlm_uni_val_projector):
        torch.nn.init.normal_(mod[0].weight, 1.0, 0.2)
        torch.nn.init.normal_(mod[1].weight, 0.0, 0.5)
    lr = torch.randn(2, 576, cfg.mm_hidden_size, dtype=torch.float64)
    hr = torch.randn(2, cfg.mm_hidden_size_aux, 192, 192, dtype=torch.float64)
    enc = enc.double()
    with torch.no_grad():
        fast = enc.mine(lr, hr)
        slow = mine_by_loops(enc, lr, hr)
    assert rel_l2(fast, slow) < 1e-12
    assert rel_l2(fast, lr) > 1e-3  # mining changed the tokens


def test_hd_feature_order_global_first():
    cfg = tiny_config(hd=True)
    enc = MGMVisionEncoder(cfg).eval()
    images, aux = torch.randn(1, 5, 3, 336, 336), torch.randn(1, 3, 1536, 1536)
    with torch.no_grad():
        out = enc(images, aux)
        hr = enc.vision_tower_aux(aux)
        lr = enc.vision_tower(images[0])
        hr_global = F.interpolate(hr, scale_factor=0.5, mode="bilinear", align_corners=False)
        expect_global = enc.mm_projector(enc.mine(lr[4:5], hr_global))
        expect_br = enc.mm_projector(enc.mine(lr[3:4], hr[:, :, 192:, 192:]))
    assert rel_l2(out[:, :576], expect_global) < 1e-6
    assert rel_l2(out[:, -576:], expect_br) < 1e-6


def test_real_sizes_are_the_default_towers():
    raw = tiny_config_dict("llama")[0]
    raw.pop("mm_vision_tower_config")
    raw.pop("mm_vision_tower_aux_config")
    raw["mm_hidden_size"], raw["mm_hidden_size_aux"] = 1024, 2880
    cfg = MGMConfig.from_dict(raw)
    assert cfg.clip_config.hidden_size == 1024 and cfg.clip_config.num_hidden_layers == 24
    assert cfg.convnext_dims == [192, 384, 768, 1536] and cfg.convnext_depths == [3, 3, 27, 3]
    assert cfg.tokens_per_image == 576


def test_random_image_end_to_end_features_are_finite(tiny_checkpoints):
    from mgm_ref.loader import load_model

    model = load_model(tiny_checkpoints("llama"))
    feats = model.image_features([random_image()])
    assert feats.shape == (1, 576, model.config.hidden_size) and torch.isfinite(feats).all()
