"""Encoded images -> image features, with the feature cache in front of the pixel work.

For a batch of requests: each image is keyed from its raw bytes (`image_key`); a key found in the
cache skips decoding, resizing and both towers. The distinct missing images are decoded and turned
into pixels exactly as `mgm_ref.preprocess` does, run through the vision artifact together (an image
repeated in the batch runs once), and stored. A bad image fails only the requests that carry it and
is never stored; a failed artifact run stores nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgm_ref.config import MGMConfig
from mgm_ref.constants import MAX_IMAGE_PIXELS
from mgm_ref.errors import ImageError, MGMError
from mgm_ref.preprocess import ImageProcessor, inspect_image, load_image
from triton_models.lib.image_cache import FeatureCache
from triton_models.lib.image_key import PixelConfig, image_key
from triton_models.lib.vision_runner import VisionRunner

MB = 1 << 20


@dataclass
class EncodeCounts:
    """What the encoder did, cumulatively (the cache keeps hits and misses)."""

    images: int = 0  # images asked for, repeats included
    computed: int = 0  # images run through the towers
    failed: int = 0  # distinct images refused or lost to a failed run
    last_computed: int = 0  # images run through the towers by the latest call


class ImageFeatureEncoder:
    def __init__(
        self,
        runner: VisionRunner,
        config: MGMConfig,
        pixel_config: PixelConfig,
        cache: FeatureCache,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.runner, self.config, self.pixel_config, self.cache = runner, config, pixel_config, cache
        self.processor = ImageProcessor(config)
        self.max_image_pixels = max_image_pixels
        self.counts = EncodeCounts()

    @classmethod
    def for_checkpoint(cls, model_dir: str | Path, runner: VisionRunner, cache_bytes: int) -> ImageFeatureEncoder:
        config = MGMConfig.from_model_dir(model_dir)
        return cls(runner, config, PixelConfig.from_model_dir(model_dir, config), FeatureCache(cache_bytes))

    def key(self, raw: bytes) -> bytes:
        return image_key(raw, self.pixel_config)

    def pixels(self, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(LR views, HR pixels) of one image, each with a leading 1; bad input raises ImageError."""
        inspect_image(raw, self.max_image_pixels)  # the padded-square limit, before any decoding
        out = self.processor([load_image(raw, self.max_image_pixels)])
        return out.images.numpy(), out.images_aux.numpy()

    def __call__(self, batch: list[list[bytes]]) -> list[np.ndarray | Exception]:
        """Per request: its (n, T, H) float32 features, or the error that fails it alone."""
        keys = [[self.key(raw) for raw in images] for images in batch]
        raw_of: dict[bytes, bytes] = {}
        for request_keys, images in zip(keys, batch, strict=True):
            for k, raw in zip(request_keys, images, strict=True):
                raw_of.setdefault(k, raw)
        self.counts.images += sum(map(len, keys))
        found: dict[bytes, np.ndarray] = {}
        failed: dict[bytes, Exception] = {}
        todo = []
        for k, raw in raw_of.items():
            cached = self.cache.get(k) if self.cache.enabled else None
            if cached is not None:
                found[k] = cached
                continue
            try:
                todo.append((k, self.pixels(raw)))
            except MGMError as e:
                failed[k] = e
        self.counts.last_computed = len(todo)
        if todo:
            self.run(todo, found, failed)
        self.counts.failed += len(failed)
        return [self.request_result(request_keys, found, failed) for request_keys in keys]

    def run(self, todo, found: dict, failed: dict) -> None:
        try:
            features = self.runner(
                np.concatenate([lr for _, (lr, _) in todo]), np.concatenate([hr for _, (_, hr) in todo])
            )
        except Exception as e:  # noqa: BLE001 - the run failed: each request that needed it gets the error
            failed.update((k, e) for k, _ in todo)
            return
        self.counts.computed += len(todo)
        for (k, _), f in zip(todo, features, strict=True):
            found[k] = f
            self.cache.put(k, f)

    def request_result(self, request_keys: list[bytes], found: dict, failed: dict) -> np.ndarray | Exception:
        for i, k in enumerate(request_keys):
            if k in failed:
                error = failed[k]
                if isinstance(error, ImageError) and len(request_keys) > 1:
                    return ImageError(f"image {i + 1} of {len(request_keys)}: {error}")
                return error
        if not request_keys:
            return np.zeros((0, self.runner.tokens_per_image, self.runner.hidden_size), np.float32)
        return np.stack([found[k] for k in request_keys])
