"""Run a built vision artifact (pixels -> image features) in chunks of its max_batch_size.

Whichever backend built it (`mgm-build vision`: ONNX Runtime on CPU, TensorRT on GPU), the artifact
folder's config.json says how to load it; `mgm_runtime.vision_artifact.load_vision_artifact` does that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mgm_runtime.vision_artifact import load_vision_artifact


class VisionRunner:
    def __init__(self, config: dict, runner):
        """`config`: the artifact's config.json; `runner(images=, images_aux=)` -> {"image_features": ...}."""
        self.config, self.runner = config, runner
        self.max_batch_size = int(self.config["max_batch_size"])
        self.tokens_per_image = int(self.config["tokens_per_image"])
        self.hidden_size = int(self.config["hidden_size"])

    @classmethod
    def from_dir(cls, artifact_dir: str | Path, threads: int | None = None) -> VisionRunner:
        return cls(*load_vision_artifact(artifact_dir, threads))

    def __call__(self, images: np.ndarray, images_aux: np.ndarray) -> np.ndarray:
        """(N, T, H) float32 features for N images (N may be 0: a text-only request)."""
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, self.tokens_per_image, self.hidden_size), np.float32)
        chunks = []
        for i in range(0, n, self.max_batch_size):
            out = self.runner(
                images=torch.from_numpy(images[i : i + self.max_batch_size]),
                images_aux=torch.from_numpy(images_aux[i : i + self.max_batch_size]),
            )["image_features"]
            chunks.append(out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32))
        return np.concatenate(chunks)
