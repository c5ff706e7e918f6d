"""LLM serving benchmark: the in-flight batching engine (the CPU `tensorrt_llm` model) vs HF generate
one request at a time (the original MGM repo's way), same requests, same run.

    mgm-bench llm_engine [--size tiny|7b] [--device cpu|cuda] [--requests 8] [--new_tokens 128]

Each request is a text prompt plus 576 prompt-table rows (one image), greedy, no stop token, so both
sides produce exactly `new_tokens` tokens per request. Random weights (`--size 7b`: Vicuna-7B shapes,
fp16 on CUDA); the engine's tokens are checked against HF generate's for the first request.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mgm_runtime.prompt_table import embed_with_prompt_table, fake_ids
from triton_models.lib import attention
from triton_models.lib.engine import GenerationRequest, LLMEngine

SIZES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


def make_requests(cfg, n, text_len, new_tokens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for k in range(n):
        text = torch.randint(3, cfg.vocab_size, (text_len,), generator=g).tolist()
        table = (torch.randn(576, cfg.hidden_size, generator=g) * 0.02).to(dtype)
        ids = text[:5] + fake_ids(cfg.vocab_size, 576) + text[5:]
        reqs.append(
            GenerationRequest(
                input_ids=ids, prompt_table=table, max_new_tokens=new_tokens, stop_ids=[], request_id=str(k)
            )
        )
    return reqs


def embeds_of(llm, req):
    ids = torch.tensor(req.input_ids, device=llm.device)
    return embed_with_prompt_table(ids, llm.get_input_embeddings(), req.prompt_table, llm.config.vocab_size)[None]


@torch.inference_mode()
def hf_sequential(llm, reqs):
    outs, start = [], time.perf_counter()
    for r in reqs:
        out = llm.generate(
            inputs_embeds=embeds_of(llm, r),
            max_new_tokens=r.max_new_tokens,
            min_new_tokens=r.max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )
        outs.append(out[0].tolist())
    sync()
    return outs, time.perf_counter() - start


def engine_concurrent(llm, reqs, max_batch):
    attention.use_native_gqa(llm, llm.device)
    engine = LLMEngine(llm, max_batch_size=max_batch, device=llm.device)
    try:
        engine.generate(make_requests(llm.config, 1, 8, 2, reqs[0].prompt_table.dtype, seed=99)[0])  # warm-up
        start = time.perf_counter()
        handles = [engine.submit(r) for r in reqs]
        outs = [h.result() for h in handles]
        ttft = [h.first_token_at - h.submitted_at for h in handles]
        sync()
        return outs, time.perf_counter() - start, ttft, engine.stats
    finally:
        engine.shutdown()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--text_len", type=int, default=40)
    p.add_argument("--new_tokens", type=int, default=128)
    args = p.parse_args(argv)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES[args.size], max_position_embeddings=4096)
    with torch.device(args.device):
        llm = LlamaForCausalLM(cfg).to(dtype).eval()
    reqs = make_requests(cfg, args.requests, args.text_len, args.new_tokens, dtype)
    print(
        f"LLM {args.size} on {args.device} ({dtype}), {args.requests} requests x "
        f"({args.text_len} text + 576 image) tokens -> {args.new_tokens} new tokens each",
        flush=True,
    )
    hf_sequential(llm, reqs[:1])  # warm-up
    hf_out, hf_s = hf_sequential(llm, reqs)
    eng_out, eng_s, ttft, stats = engine_concurrent(llm, reqs, args.requests)
    total = args.requests * args.new_tokens
    same = sum(a == b for a, b in zip(hf_out, eng_out, strict=True))
    print(
        f"| path | wall s | output tok/s | ratio |\n|---|---|---|---|\n"
        f"| HF generate, one at a time | {hf_s:.2f} | {total / hf_s:.0f} | 1.00 |\n"
        f"| engine, {args.requests} concurrent (in-flight) | {eng_s:.2f} | {total / eng_s:.0f} | {hf_s / eng_s:.2f} |"
    )
    print(
        f"engine TTFT mean {1000 * sum(ttft) / len(ttft):.0f} ms, max {1000 * max(ttft):.0f} ms; "
        f"max batch {stats['max_batch_seen']}; greedy tokens identical to HF for {same}/{len(reqs)} requests"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
