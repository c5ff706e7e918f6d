"""The same workload through the in-process reference (`mgm_ref`, the original repo's way: one request
at a time, HF generate, greedy), and the parity of served answers with it."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from pathlib import Path

from client.bench.data import StreamStats, WorkItem, summarize
from client.bench.report import BaselineResult


def _token_timer():
    from transformers.generation.streamers import BaseStreamer

    class TokenTimer(BaseStreamer):
        """Times every generated token: HF generate puts the prompt (2-D) first, then (batch,) per step."""

        def __init__(self):
            self.stamps: list[float] = []
            self.tokens = 0

        def put(self, value):
            if value.dim() == 1:
                self.stamps.append(time.perf_counter())
                self.tokens += int(value.numel())

        def end(self):
            pass

    return TokenTimer


def answer_key(prompt: str, image_bytes: int) -> str:
    return f"{prompt}|{image_bytes}"


def run_baseline(model_dir: Path, items: Sequence[WorkItem], max_tokens: int, n_requests: int) -> BaselineResult:
    """The workload through mgm_ref in this process: `MGM.chat`, one request at a time, greedy."""
    from mgm_ref.loader import load_model
    from mgm_ref.model import GenerationParams
    from mgm_ref.preprocess import load_image

    model = load_model(model_dir)
    timer_cls = _token_timer()
    params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)

    def one(model, item: WorkItem):
        timer = timer_cls()
        start = time.perf_counter()
        text = model.chat(item.prompt, [load_image(item.image)], params, streamer_factory=lambda tok: timer)
        end = time.perf_counter()
        return start, end, timer, text

    one(model, items[0])  # warm-up, not timed
    latencies, ttfts, itls, tokens, answers = [], [], [], [], {}
    wall = 0.0
    for k in range(n_requests):
        item = items[k % len(items)]
        start, end, timer, text = one(model, item)
        wall += end - start
        latencies.append((end - start) * 1000)
        tokens.append(timer.tokens)
        if timer.stamps:
            ttfts.append((timer.stamps[0] - start) * 1000)
            if timer.tokens > 1:
                itls.append(((end - start) * 1000 - ttfts[-1]) / (timer.tokens - 1))
        answers.setdefault(answer_key(*item.key), text)
    del model  # the model (GiBs at real sizes) goes before the served run starts
    gc.collect()
    return BaselineResult(
        requests=n_requests,
        wall_s=wall,
        throughput=n_requests / wall,
        tokens_per_s=sum(tokens) / wall,
        latency_ms=summarize(latencies),
        ttft_ms=summarize(ttfts),
        itl_ms=summarize(itls),
        mean_output_tokens=sum(tokens) / n_requests,
        answers=answers,
    )


def parity(stats: StreamStats, baseline: BaselineResult) -> tuple[int, int]:
    """(served answers equal to the in-process ones, workload items compared): first answer per item."""
    served: dict[str, str] = {}
    for r in stats.requests:
        if r.key is not None:
            served.setdefault(answer_key(*r.key), r.text)
    keys = [k for k in served if k in baseline.answers]
    return sum(served[k].strip() == baseline.answers[k].strip() for k in keys), len(keys)
