"""`mgm-bench openai`: the OpenAI endpoint vs direct Triton gRPC, same workload, same run.

    mgm-bench openai --start_server                                  # tiny llama on CPU, both servers
    mgm-bench openai --triton_url 127.0.0.1:8001 --openai_url http://127.0.0.1:9000 --model mgm

Per concurrency level the same request (an image and a question, greedy, streamed) goes through
both paths in alternating rounds of `concurrency` parallel requests: directly to `mgm_bls` over gRPC
streaming (the async client the OpenAI server itself uses) and through POST /v1/chat/completions
(SSE, read with aiohttp, the HTTP client of AIPerf and genai-perf). It reports client-side TTFT
(first answer text), inter-token latency, request latency and output throughput, and the p50 TTFT
overhead of the OpenAI path against its target (5 ms + 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

from client.openai_api.mapping import to_mgm
from client.openai_api.media import MediaPolicy
from client.openai_api.schema import ChatCompletionRequest
from client.openai_api.triton import TritonBackend
from triton_models.launcher.argv import ADMIN_KEY_ENV

QUESTION = "What is in the picture? Describe it."


@dataclass
class Sample:
    ttft_s: float
    latency_s: float
    tokens: int
    itl_s: float | None = None


def _workload_image() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    buf = io.BytesIO()
    Image.fromarray((rng.rand(320, 480, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def request_body(model: str, max_tokens: int, image: bool = True) -> dict:
    import base64

    content = [{"type": "text", "text": QUESTION}]
    if image:
        url = "data:image/png;base64," + base64.b64encode(_workload_image()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": content}],
    }


def _sample(start: float, first: float | None, last: float | None, tokens: int) -> Sample:
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the answer had no text")
    itl = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(first - start, end - start, tokens, itl)


async def one_grpc(backend: TritonBackend, variant, tensors) -> Sample:
    start, first, last, tokens = time.perf_counter(), None, None, 0
    async for ev in backend.generate(variant, tensors):
        if ev.text:
            last = time.perf_counter()
            first = first or last
        tokens = ev.completion_tokens
    return _sample(start, first, last, tokens)


async def one_openai(http: aiohttp.ClientSession, url: str, body: dict) -> Sample:
    start, first, last, tokens = time.perf_counter(), None, None, 0
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:  # one SSE line at a time
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return _sample(start, first, last, tokens)


def _p(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(samples: list[Sample], wall_s: float) -> dict:
    return {
        "requests": len(samples),
        "ttft_p50_ms": 1000 * _p([s.ttft_s for s in samples], 0.5),
        "ttft_p90_ms": 1000 * _p([s.ttft_s for s in samples], 0.9),
        "itl_p50_ms": 1000 * _p([s.itl_s for s in samples], 0.5),
        "latency_p50_ms": 1000 * _p([s.latency_s for s in samples], 0.5),
        "output_tok_s": sum(s.tokens for s in samples) / wall_s if wall_s else float("nan"),
        "tokens_mean": statistics.fmean(s.tokens for s in samples),
    }


async def run(
    triton_url: str,
    openai_url: str,
    model: str,
    concurrency: list[int],
    requests: int,
    max_tokens: int,
    warmup: int = 2,
    image: bool = True,
    admin_key: str | None = None,
) -> dict:
    body = request_body(model, max_tokens, image)
    mgm = await to_mgm(ChatCompletionRequest.model_validate(body), MediaPolicy(), 8, max_tokens)
    tensors = mgm.tensors()
    backend = TritonBackend(triton_url, admin_key=admin_key)
    variant = await backend.resolve(model)
    chat_url = f"{openai_url.rstrip('/')}/v1/chat/completions"
    results = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as http:
        paths = {
            "grpc": lambda: one_grpc(backend, variant, tensors),
            "openai": lambda: one_openai(http, chat_url, body),
        }
        for path in paths.values():  # warm both paths (connections, first-request costs)
            for _ in range(warmup):
                await path()
        for c in concurrency:
            samples = {name: [] for name in paths}
            wall = {name: 0.0 for name in paths}
            for round_ in range(max(1, requests // c)):
                order = list(paths) if round_ % 2 == 0 else list(paths)[::-1]  # alternate: drift hits both
                for name in order:
                    t0 = time.perf_counter()
                    samples[name] += await asyncio.gather(*(paths[name]() for _ in range(c)))
                    wall[name] += time.perf_counter() - t0
            results[c] = {name: summarize(samples[name], wall[name]) for name in paths}
            g, o = results[c]["grpc"]["ttft_p50_ms"], results[c]["openai"]["ttft_p50_ms"]
            results[c]["ttft_overhead_ms"] = o - g
            results[c]["ttft_overhead_target_ms"] = 5 + 0.05 * g
    await backend.close()
    return results


def table(results: dict, load: tuple[float, float, float]) -> str:
    lines = [
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "",
        "| conc | path | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | latency p50 ms | out tok/s | TTFT overhead p50 "
        "(target) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, r in results.items():
        for name in ("grpc", "openai"):
            s = r[name]
            extra = ""
            if name == "openai":
                ok = "ok" if r["ttft_overhead_ms"] <= r["ttft_overhead_target_ms"] else "MISSED"
                extra = f"{r['ttft_overhead_ms']:+.1f} ms (<= {r['ttft_overhead_target_ms']:.1f}) {ok}"
            lines.append(
                f"| {c} | {name} | {s['ttft_p50_ms']:.1f} | {s['ttft_p90_ms']:.1f} | {s['itl_p50_ms']:.1f} | "
                f"{s['latency_p50_ms']:.1f} | {s['output_tok_s']:.1f} | {extra} |"
            )
    return "\n".join(lines)


def _start_servers(work: Path):
    """Tiny llama repository on CPU, tritonserver and mgm-openai on free loopback ports."""
    from client.bench.common import tiny_checkpoint_with_vision
    from client.openai_api.app import Settings  # noqa: F401  (fails early without the openai extra)
    from triton_models.repo_builder import build_repo
    from triton_models.server import TritonServer, free_port

    ckpt = tiny_checkpoint_with_vision(work, max_batch_size=4)
    server = TritonServer(build_repo(ckpt, work / "engines", work / "repo", backend="cpu")).start(timeout=600)
    import subprocess

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.openai_api", "--triton_url", server.grpc_url, "--port", str(port)],
        env={**os.environ, ADMIN_KEY_ENV: server.admin_key} if server.admin_key else None,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return server, proc, f"http://127.0.0.1:{port}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mgm-bench openai", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--triton_url", default="127.0.0.1:8001", help="Triton gRPC host:port")
    p.add_argument("--openai_url", default="http://127.0.0.1:9000", help="the mgm-openai server")
    p.add_argument("--model", default="mgm", help="OpenAI model id (a variant's name)")
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--requests", type=int, default=24, help="requests per path and concurrency level")
    p.add_argument("--max_tokens", type=int, default=16)
    p.add_argument(
        "--no_image",
        action="store_true",
        help="text-only requests (short TTFT: the fixed cost of the extra layer shows most)",
    )
    p.add_argument("--start_server", action="store_true", help="serve the tiny llama for this run")
    p.add_argument("--output_file", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    server = proc = None
    try:
        if args.start_server:
            server, proc, args.openai_url = _start_servers(Path(tempfile.mkdtemp(prefix="mgm-bench-openai-")))
            args.triton_url = server.grpc_url
        results = asyncio.run(
            run(
                args.triton_url,
                args.openai_url,
                args.model,
                levels,
                args.requests,
                args.max_tokens,
                image=not args.no_image,
                admin_key=server.admin_key if server is not None else os.environ.get(ADMIN_KEY_ENV),
            )
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        if server is not None:
            server.stop()
    print(table(results, os.getloadavg()))
    if args.output_file:
        Path(args.output_file).write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=2))
    return 0
