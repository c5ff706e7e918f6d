"""Test images: mgm_ref.tiny's synthetic scene, and a text image for the OCR tests."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mgm_ref.tiny import synthetic_scene

OCR_WORDS = ("HELLO", "WORLD")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def random_image(width: int = 500, height: int = 300, seed: int = 0) -> Image.Image:
    """A synthetic scene with sensor noise; `seed` changes both the layout and the noise."""
    return synthetic_scene(width, height, seed, noise=24)


def text_image(words=OCR_WORDS) -> Image.Image:
    """Big black words on white, one per line, in a scalable font (DejaVu if present, else Pillow's own)."""
    path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
    font = ImageFont.truetype(str(path), 64) if path.is_file() else ImageFont.load_default(size=64)
    img = Image.new("RGB", (520, 110 * len(words) + 40), "white")
    draw = ImageDraw.Draw(img)
    for k, word in enumerate(words):
        draw.text((30, 30 + 110 * k), word, fill="black", font=font)
    return img
