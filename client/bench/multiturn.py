"""`mgm-bench multiturn`: multi-turn chats about one image, with the serving caches on and off.

    mgm-bench multiturn                                  # tiny llama on CPU, 4 chats x 4 turns, concurrency 1,4
    mgm-bench multiturn --vision_size 7b                 # tiny LLM behind MGM-7B-size vision towers (random)

One tritonserver serves the same checkpoint twice, as two variants of one repository: `cached` (the
image-feature cache and the engine's prefix KV reuse on, the defaults) and `uncached` (both off). Each
chat sends its image with every turn and keeps the history client-side, as OpenAI clients do; turn
k+1's prompt therefore starts with turn k's prompt and answer. Per concurrency level both variants
run the same chats (fresh images per level, so every level starts cold), `concurrency` chats at a
time, the variants taking turns group by group. The report gives the streamed client-side TTFT per turn, the turn-2+ speed-up (target >= 5x for the
tiny model, >= 10x at 7B vision sizes), the turn-1 cost of the caches (target <= 5 %), throughput,
the cache counters from Triton's metrics endpoint, and whether both variants answered identically.
An answer whose tokens decode to no text (random weights) has no client-side first text; its TTFT is
then the server's (`time_to_first_token_ms`), the same for both variants since their answers agree.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from client.bench.common import BenchError, log, tiny_checkpoint_with_vision

VARIANTS = ("cached", "uncached")
QUESTIONS = (
    "What is in the picture?",
    "What colour is the sky?",
    "Is there a house?",
    "Describe the field.",
    "Anything else?",
    "Summarise our chat.",
)
TARGET_SPEEDUP = {"tiny": 5.0, "7b": 10.0}
TARGET_TURN1_COST = 0.05


@dataclass
class Turn:
    chat: int
    turn: int
    ttft_s: float
    latency_s: float
    tokens: int
    text: str


def chat_image(seed: int) -> bytes:
    from mgm_ref.tiny import synthetic_scene

    buf = io.BytesIO()
    synthetic_scene(480, 360, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def variant_client(url: str, variant: str):
    from client.mgm_client import MGMClient

    return MGMClient(url, model=f"{variant}_mgm_bls", timeout_s=600)


def run_chat(url: str, variant: str, chat: int, image: bytes, turns: int, max_tokens: int) -> list[Turn]:
    """One chat of `turns` turns; the image goes with every turn, the history grows client-side."""
    client = variant_client(url, variant)
    history: list[tuple[str, str]] = []
    out = []
    for k in range(turns):
        question = QUESTIONS[k % len(QUESTIONS)]
        answer = client.stream_answer(
            question, [image], max_tokens=max_tokens, temperature=0.0, history=history or None
        )
        ttft_s = answer.client_ttft_s
        if ttft_s is None:  # tokens that decode to no text (random weights): the server's own TTFT
            if not answer.output_tokens:
                raise BenchError(f"{variant} chat {chat} turn {k + 1}: the answer had no tokens")
            ttft_s = answer.ttft_ms / 1000
        out.append(Turn(chat, k + 1, ttft_s, answer.latency_s, answer.output_tokens, answer.text))
        history.append((question, answer.text))
    return out


def warm_up(url: str, variant: str) -> None:
    """One short request per variant; its answer may be empty (2 random-weight tokens can be spaces)."""
    variant_client(url, variant).generate(QUESTIONS[0], [chat_image(seed=7)], max_tokens=2, temperature=0.0)


def run_level(
    url: str, variant: str, images: list[bytes], concurrency: int, turns: int, max_tokens: int, first_chat: int = 0
):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        chats = list(
            pool.map(lambda i: run_chat(url, variant, first_chat + i, images[i], turns, max_tokens), range(len(images)))
        )
    return [t for chat in chats for t in chat], time.perf_counter() - t0


def cache_counters(metrics_url: str) -> dict[str, float]:
    """Every `mgm_*cache*` sample on Triton's metrics endpoint, summed over label sets."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mgm_") and "cache" in line.split("{")[0].split(" ")[0]:
            name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def summarize(turns: list[Turn], wall_s: float, n_turns: int) -> dict:
    by_turn = {k: statistics.median(t.ttft_s for t in turns if t.turn == k) * 1000 for k in range(1, n_turns + 1)}
    return {
        "ttft_p50_ms_by_turn": by_turn,
        "ttft_p50_ms_turn2plus": statistics.median(t.ttft_s for t in turns if t.turn > 1) * 1000,
        "turns_per_s": len(turns) / wall_s,
        "output_tok_s": sum(t.tokens for t in turns) / wall_s,
    }


def run(url: str, metrics_url: str, levels: list[int], chats: int, turns: int, max_tokens: int) -> dict:
    results: dict = {}
    for level_index, c in enumerate(levels):
        images = [chat_image(seed=1000 * (level_index + 1) + i) for i in range(chats)]
        done: dict[str, list[Turn]] = {v: [] for v in VARIANTS}
        wall = dict.fromkeys(VARIANTS, 0.0)
        counters = {v: {} for v in VARIANTS}
        log(f"concurrency {c}: {chats} chats x {turns} turns through each of {', '.join(VARIANTS)}")
        # `c` chats at a time through one variant, then the same chats through the other, the order
        # alternating from group to group: load drift on a shared machine hits both variants alike.
        for g, start in enumerate(range(0, chats, c)):
            group = images[start : start + c]
            for variant in VARIANTS if g % 2 == 0 else VARIANTS[::-1]:
                before = cache_counters(metrics_url)
                got, seconds = run_level(url, variant, group, c, turns, max_tokens, first_chat=start)
                done[variant] += got
                wall[variant] += seconds
                for k, v in _delta(cache_counters(metrics_url), before).items():
                    counters[variant][k] = counters[variant].get(k, 0.0) + v
        level: dict = {}
        for variant in VARIANTS:
            level[variant] = summarize(done[variant], wall[variant], turns)
            level[variant]["cache_counters"] = counters[variant]
        on, off = level["cached"], level["uncached"]
        level["speedup_turn2plus"] = off["ttft_p50_ms_turn2plus"] / on["ttft_p50_ms_turn2plus"]
        level["turn1_cost"] = on["ttft_p50_ms_by_turn"][1] / off["ttft_p50_ms_by_turn"][1] - 1
        answers = {v: {(t.chat, t.turn): t.text for t in done[v]} for v in VARIANTS}
        level["identical_answers"] = answers["cached"] == answers["uncached"]
        results[c] = level
    return results


def table(results: dict, vision_size: str, load: tuple[float, float, float]) -> str:
    target = TARGET_SPEEDUP[vision_size]
    lines = [f"vision size {vision_size}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", ""]
    for c, r in results.items():
        n_turns = len(r["cached"]["ttft_p50_ms_by_turn"])
        head = " | ".join(f"turn {k} TTFT p50 ms" for k in range(1, n_turns + 1))
        lines += [f"concurrency {c}:", f"| caches | {head} | turns/s | out tok/s |", "|---" * (n_turns + 3) + "|"]
        for v in VARIANTS:
            s = r[v]
            cells = " | ".join(f"{s['ttft_p50_ms_by_turn'][k]:.1f}" for k in range(1, n_turns + 1))
            lines.append(
                f"| {'on' if v == 'cached' else 'off'} | {cells} | {s['turns_per_s']:.2f} | {s['output_tok_s']:.1f} |"
            )
        ok = "ok" if r["speedup_turn2plus"] >= target else "MISSED"
        ok1 = "ok" if r["turn1_cost"] <= TARGET_TURN1_COST else "MISSED"
        lines += [
            f"turn 2+ TTFT speed-up {r['speedup_turn2plus']:.1f}x (target >= {target:g}x) {ok}; "
            f"turn 1 with caches {r['turn1_cost']:+.1%} (target <= +5 %) {ok1}; "
            f"identical answers: {r['identical_answers']}",
            f"cache counters (caches on): {json.dumps(r['cached']['cache_counters'], sort_keys=True)}",
            "",
        ]
    return "\n".join(lines)


def build_two_variant_repo(work: Path, vision_size: str, llm: str) -> Path:
    """A checkpoint, its vision artifact, and one repository holding it as `cached` and `uncached`."""
    from triton_models.repo_builder import ServingOptions, build_repo

    t = time.perf_counter()
    ckpt = tiny_checkpoint_with_vision(work, llm, "real" if vision_size == "7b" else "tiny")
    log(f"wrote the checkpoint and built its {vision_size} vision artifact in {time.perf_counter() - t:.0f} s")
    repo = work / "repo"
    build_repo(ckpt, work / "engines", repo, backend="cpu", name="cached")
    off = ServingOptions(image_cache_mb=0, kv_cache_reuse=False)
    build_repo(ckpt, work / "engines", repo, backend="cpu", name="uncached", options=off)
    return repo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mgm-bench multiturn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--vision_size", choices=sorted(TARGET_SPEEDUP), default="tiny")
    p.add_argument("--llm", default="llama", help="tiny LLM family")
    p.add_argument("--chats", type=int, default=4, help="chats per variant and concurrency level")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--max_tokens", type=int, default=8)
    p.add_argument("--work_dir", type=Path, default=None, help="where the checkpoint and repository go")
    p.add_argument("--output_file", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.turns < 2 or args.chats < 1 or args.max_tokens < 1:
        p.error("--turns must be >= 2, --chats and --max_tokens >= 1")
    levels = [int(c) for c in args.concurrency.split(",")]
    from triton_models.server import TritonServer

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mgm-bench-multiturn-"))
    repo = build_two_variant_repo(work, args.vision_size, args.llm)
    server = TritonServer(repo).start(timeout=900)  # two 7b-size vision encoders take a while to load
    try:
        for variant in VARIANTS:  # first-request costs (thread pools, allocations) stay out of the numbers
            warm_up(server.grpc_url, variant)
        results = run(server.grpc_url, server.metrics_url, levels, args.chats, args.turns, args.max_tokens)
    finally:
        server.stop()
    print(table(results, args.vision_size, os.getloadavg()))
    if args.output_file:
        args.output_file.write_text(
            json.dumps({"vision_size": args.vision_size, "load_average": os.getloadavg(), "results": results}, indent=2)
        )
    # Like the other benchmarks, missed targets are reported, not failed; different answers are a defect.
    return 0 if all(r["identical_answers"] for r in results.values()) else 1
