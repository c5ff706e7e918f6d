"""Measure the image-feature cache at MGM-7B vision sizes (random weights, PyTorch towers on CPU):
one request's encode time on a miss vs a hit, and the bytes an image puts on the wire before and after.

    .venv/bin/python -m tests.helpers.image_cache_timing [--hd] [--threads 2]

A measurement run by hand (minutes, several GB of memory), not a test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from client.bench.vision import make_encoder, real_config
from mgm_ref.preprocess import ImageProcessor, load_image
from tests.helpers.images import png, random_image
from triton_models.lib.image_cache import FeatureCache
from triton_models.lib.image_encoder import ImageFeatureEncoder
from triton_models.lib.image_key import PixelConfig
from triton_models.lib.vision_runner import VisionRunner


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hd", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = real_config(args.hd)
    towers = make_encoder(cfg)

    def run(images, images_aux):
        with torch.inference_mode():
            return {"image_features": towers(images, images_aux)}

    runner = VisionRunner(
        {"max_batch_size": 1, "tokens_per_image": cfg.tokens_per_image, "hidden_size": cfg.hidden_size}, run
    )
    pixel_config = PixelConfig(
        cfg.lr_size, cfg.lr_input_size, cfg.image_size_aux, cfg.image_grid, cfg.image_global, "pad", (), (), "bench"
    )
    enc = ImageFeatureEncoder(runner, cfg, pixel_config, FeatureCache(2 << 30))
    raw = png(random_image(640, 480, seed=7))
    times = {}
    for name in ("miss", "hit", "hit again"):
        wall, cpu = time.perf_counter(), time.process_time()
        (features,) = enc([[raw]])
        times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        print(f"{name}: {times[name][0] * 1e3:.1f} ms wall, {times[name][1] * 1e3:.1f} ms CPU", flush=True)
    pixels = ImageProcessor(cfg)([load_image(raw)])
    before = pixels.images.numpy().nbytes + pixels.images_aux.numpy().nbytes
    after = len(raw) + 4 + 8 * cfg.tokens_per_image  # bytes, their size, the extra ids
    print(
        f"{'MGM-7B-HD' if args.hd else 'MGM-7B'} vision sizes, features {features.shape} "
        f"({features.nbytes / 2**20:.1f} MB per cache entry): miss/hit {times['miss'][0] / times['hit'][0]:.0f}x wall; "
        f"wire per image: fp32 pixels {before} B before, {after} B after (PNG {len(raw)} B + size + extra ids)"
    )
    assert np.isfinite(features).all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
