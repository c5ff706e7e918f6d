"""The main job (`make demo`): serve an MGM model through Triton and ask it about an image.

Builds the CPU artifacts for the built-in tiny checkpoint (or the checkpoint in $MGM_MODEL_DIR /
--model_dir), fills the model repository, starts the server on loopback, asks one question over
gRPC with streaming, prints the answer and the timings, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

WORK = Path(os.environ.get("MGM_WORK_DIR", "work_dirs/demo"))


def sample_image(path: Path) -> Path:
    """A small synthetic scene (no assets to download): sky, sun, house, grass."""
    img = Image.new("RGB", (640, 480), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 340, 640, 480], fill=(70, 160, 60))
    d.ellipse([480, 40, 580, 140], fill=(250, 220, 60))
    d.rectangle([180, 220, 380, 360], fill=(200, 60, 50))
    d.polygon([(160, 220), (280, 130), (400, 220)], fill=(120, 70, 40))
    d.rectangle([260, 290, 300, 360], fill=(90, 50, 30))
    img.save(path)
    return path


def step(message: str) -> float:
    print(f"[demo] {message}", flush=True)
    return time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=os.environ.get("MGM_MODEL_DIR"),
                   help="MGM checkpoint folder (default: $MGM_MODEL_DIR, else the built-in tiny model)")
    p.add_argument("--image", default=None, help="image to ask about (default: a generated scene)")
    p.add_argument("--prompt", default="What is shown in this image?")
    p.add_argument("--max_tokens", type=int, default=32)
    args = p.parse_args(argv)

    from build_engines.vision import build_vision
    from client.mgm_client import MGMClient
    from mgm_ref.config import MGMConfig
    from mgm_ref.loader import load_vision
    from mgm_ref.tiny import write_tiny_checkpoint
    from triton_models.repo_builder import build_repo
    from triton_models.server import TritonServer

    WORK.mkdir(parents=True, exist_ok=True)
    t = step("preparing the checkpoint")
    model_dir = Path(args.model_dir) if args.model_dir else WORK / "tiny-mgm-llama"
    if not args.model_dir and not (model_dir / "config.json").is_file():
        write_tiny_checkpoint(model_dir, "llama")
    image = Path(args.image) if args.image else sample_image(WORK / "sample.png")

    vision_dir = WORK / "engines" / model_dir.name / "vision"
    if not (vision_dir / "config.json").is_file():
        t = step("building the vision artifact (ONNX Runtime, float32)")
        cfg = MGMConfig.from_model_dir(model_dir)
        build_vision(load_vision(model_dir, config=cfg), cfg, vision_dir, dtype="float32", backend="onnxruntime",
                     max_batch_size=4)
    repo = build_repo(model_dir, vision_dir.parent, WORK / "repo", backend="cpu")
    t = step(f"starting tritonserver on {repo}")
    with TritonServer(repo) as server:  # starts, waits for readiness, stops on exit
        startup = time.perf_counter() - t
        client = MGMClient(server.grpc_url, protocol="grpc")
        client.wait_ready()
        step(f"server ready in {startup:.1f} s; asking over gRPC (streaming): {args.prompt!r} about {image}")
        print("ASSISTANT: ", end="", flush=True)
        answer = client.stream_answer(args.prompt, [image], max_tokens=args.max_tokens, temperature=0.0,
                                      on_delta=lambda d: print(d, end="", flush=True))
        print()
        print(f"[demo] {answer.output_tokens} tokens; time to first token {answer.ttft_ms:.0f} ms (server), "
              f"{(answer.client_ttft_s or 0) * 1000:.0f} ms (client); total {answer.latency_s * 1000:.0f} ms; "
              f"{answer.output_tokens / max(answer.latency_s, 1e-9):.1f} tokens/s")
    step("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
