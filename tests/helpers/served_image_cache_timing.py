"""vision_encoder's time per request on a served tiny CPU repository, cache miss vs hit, from Triton's
own model statistics (compute_infer), plus the answers' TTFT:

    .venv/bin/python -m tests.helpers.served_image_cache_timing [--hd] [--images 5]

A measurement run by hand, not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request
from pathlib import Path

from client.cpu_repo import prepare_cpu_repo
from client.mgm_client import MGMClient
from mgm_ref.tiny import write_tiny_checkpoint
from tests.helpers.images import png, random_image
from triton_models.server import TritonServer


def vision_stats(server) -> tuple[int, int]:
    """(executions, compute_infer ns) of vision_encoder so far."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/vision_encoder/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return int(stats["execution_count"]), int(stats["inference_stats"]["compute_infer"]["ns"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hd", action="store_true")
    p.add_argument("--images", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", "llama", args.hd, seed=0)
        _, repo = prepare_cpu_repo(ckpt, Path(tmp) / "work", log=lambda m: None)
        server = TritonServer(repo).start(timeout=600)
        try:
            client = MGMClient(server.grpc_url, protocol="grpc", model="mgm_bls", timeout_s=300)
            client.generate("Hi.", [png(random_image(64, 64, seed=1))], max_tokens=2)  # warm-up
            images = [png(random_image(640, 480, seed=50 + k)) for k in range(args.images)]
            for label in ("miss", "hit"):
                n0, ns0 = vision_stats(server)
                ttft = [client.stream_answer("What is it?", [img], max_tokens=4).ttft_ms for img in images]
                n1, ns1 = vision_stats(server)
                print(
                    f"{label}: vision_encoder {(ns1 - ns0) / (n1 - n0) / 1e6:.1f} ms per execution "
                    f"({n1 - n0} executions), TTFT median {sorted(ttft)[len(ttft) // 2]:.0f} ms",
                    flush=True,
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
