"""Shared fixtures: tiny MGM checkpoints written once per test session in the official format."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mgm_ref.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Factory: tiny_checkpoints(llm, hd=False, template=None) -> path, cached per session."""
    cache = {}

    def get(llm: str = "llama", hd: bool = False, template: str | None = None, shards: int = 2):
        key = (llm, hd, template, shards)
        if key not in cache:
            name = f"{llm}{'-hd' if hd else ''}{'-' + template if template else ''}-s{shards}"
            cache[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(name), llm, hd, seed=0,
                                               template=template, shards=shards)
        return cache[key]

    return get


def random_image(width: int = 500, height: int = 300, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def rel_l2(a, b) -> float:
    import torch
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
