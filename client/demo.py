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

WORK = Path(os.environ.get("MGM_WORK_DIR", "work_dirs/demo"))


def step(message: str) -> float:
    print(f"[demo] {message}", flush=True)
    return time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model_dir",
        default=os.environ.get("MGM_MODEL_DIR"),
        help="MGM checkpoint folder (default: $MGM_MODEL_DIR, else the built-in tiny model)",
    )
    p.add_argument("--image", default=None, help="image to ask about (default: a generated scene)")
    p.add_argument("--prompt", default="What is shown in this image?")
    p.add_argument("--max_tokens", type=int, default=32)
    args = p.parse_args(argv)

    from client.cpu_repo import prepare_cpu_repo
    from client.mgm_client import MGMClient
    from mgm_ref.tiny import synthetic_scene
    from triton_models.server import TritonServer

    step("preparing the checkpoint, the vision artifact and the model repository")
    _, repo = prepare_cpu_repo(Path(args.model_dir) if args.model_dir else None, WORK, log=step, verify=True)
    if args.image:
        image = Path(args.image)
    else:
        image = WORK / "sample.png"
        synthetic_scene(640, 480).save(image)
    t = step(f"starting tritonserver on {repo}")
    with TritonServer(repo) as server:  # starts, waits for readiness, stops on exit
        startup = time.perf_counter() - t
        client = MGMClient(server.grpc_url, protocol="grpc")
        client.wait_ready()
        step(f"server ready in {startup:.1f} s; asking over gRPC (streaming): {args.prompt!r} about {image}")
        print("ASSISTANT: ", end="", flush=True)
        answer = client.stream_answer(
            args.prompt,
            [image],
            max_tokens=args.max_tokens,
            temperature=0.0,
            on_delta=lambda d: print(d, end="", flush=True),
        )
        print()
        print(
            f"[demo] {answer.output_tokens} tokens; time to first token {answer.ttft_ms:.0f} ms (server), "
            f"{(answer.client_ttft_s or 0) * 1000:.0f} ms (client); total {answer.latency_s * 1000:.0f} ms; "
            f"{answer.output_tokens / max(answer.latency_s, 1e-9):.1f} tokens/s"
        )
    step("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
