"""The identity of an image's features: one key shared by preprocessing, vision_encoder and the LLM.

`image_key` hashes the raw encoded bytes together with everything that changes the pixels or the
features made from them (the pixel sizes, the HD grid, the aspect-ratio mode, the normalisation and
the checkpoint). Two requests whose images have the same key get the same features, so the key can
name a cached feature entry and, as `extra_id`, the prompt-table rows of that image in the LLM's
prefix cache. Raw bytes, not pixels: the key must be known before any decoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mgm_ref.config import MGMConfig
from mgm_ref.constants import CLIP_MEAN, CLIP_STD

# Bump when the pixel code (mgm_ref.preprocess) changes what the same bytes turn into.
PIXEL_CODE_VERSION = 1
KEY_BYTES = 32


@dataclass(frozen=True)
class PixelConfig:
    """Everything besides the bytes that decides an image's features."""

    lr_size: int
    lr_input_size: int
    image_size_aux: int
    image_grid: int
    image_global: bool
    aspect_ratio: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str  # checkpoint_identity(): which weights make the features
    pixel_code_version: int = PIXEL_CODE_VERSION

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: MGMConfig | None = None) -> PixelConfig:
        config = config or MGMConfig.from_model_dir(model_dir)
        return cls(
            lr_size=config.lr_size,
            lr_input_size=config.lr_input_size,
            image_size_aux=config.image_size_aux,
            image_grid=config.image_grid,
            image_global=config.image_global,
            aspect_ratio=str(config.raw.get("image_aspect_ratio", "pad")),
            mean=tuple(CLIP_MEAN),
            std=tuple(CLIP_STD),
            checkpoint=checkpoint_identity(model_dir),
        )

    def fingerprint(self) -> bytes:
        """A fixed-length digest of this config (fixed length: no ambiguity when bytes follow it)."""
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(text, digest_size=KEY_BYTES).digest()


def checkpoint_identity(model_dir: str | Path) -> str:
    """A digest of the checkpoint's config.json and its weight files' names, sizes and mtimes.

    Cheap (no weight bytes are read) and the same in every process that reads the same folder;
    the caches keyed by it live in memory, so a checkpoint changed later is only seen after a restart.
    """
    folder = Path(model_dir).resolve()
    h = hashlib.blake2b(digest_size=16)
    h.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def image_key(raw: bytes, pixel_config: PixelConfig) -> bytes:
    """The 32-byte key of one encoded image under `pixel_config`."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"mgm-image-key")
    h.update(pixel_config.fingerprint())
    h.update(raw)
    return h.digest()


def extra_id(key: bytes) -> int:
    """The key's first 8 bytes as a little-endian uint64 with the top bit set: never 0 (a text token)."""
    return int.from_bytes(key[:8], "little") | (1 << 63)


def prompt_table_extra_ids(input_ids: np.ndarray, vocab_offset: int, tokens_per_image: int, keys: list[bytes]):
    """(L,) uint64: 0 for a text token, `extra_id` of image k for each of its prompt-table rows."""
    ids = np.asarray(input_ids, np.int64)
    out = np.zeros(ids.shape, np.uint64)
    rows = ids >= vocab_offset
    if keys:
        per_image = np.array([extra_id(k) for k in keys], np.uint64)
        image = (ids[rows] - vocab_offset) // tokens_per_image
        out[rows] = per_image[image]
    elif rows.any():
        raise ValueError("image rows in the prompt but no image keys")
    return out
