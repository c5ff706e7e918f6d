"""The CPU tensorrt_llm model with prefix KV reuse: prompt_table_extra_ids in, the same tokens as with reuse
off, Triton custom metrics for hits/misses/evictions/bytes, and the `mgm-build repo` switches."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tests import triton_stub as tb
from tests.helpers.repo_fixtures import fake_vision
from tests.test_triton_models import start, values
from triton_models.lib.triton_io import ModelConfigError
from triton_models.repo_builder import DEFAULT_KV_CACHE_MB, ServingOptions, build_repo

KEY = (1 << 63) | 0xABCDEF


def image_request(vocab, hidden, text, rows=40, extra=True, seed=0, max_tokens=6):
    g = torch.Generator().manual_seed(seed)
    ids = [1, 5, 6] + list(range(vocab, vocab + rows)) + text
    inputs = {
        "input_ids": np.array([ids], np.int32),
        "input_lengths": np.array([[len(ids)]], np.int32),
        "request_output_len": np.array([[max_tokens]], np.int32),
        "prompt_embedding_table": torch.randn(1, rows, hidden, generator=g).numpy(),
        "streaming": np.array([[False]]),
    }
    if extra:
        inputs["prompt_table_extra_ids"] = np.array([[KEY if t >= vocab else 0 for t in ids]], np.uint64)
    return tb.Request(inputs, request_id=f"r{len(ids)}")


def answers(model, requests):
    out = []
    for r in requests:  # one after the other: each turn may reuse the one before
        asyncio.run(model.execute([r]))
        response = r.sender.responses()[-1]
        assert not response.has_error(), response.error().message()
        out.append(response.output("output_ids").reshape(-1).tolist())
    return out


def metric(name: str) -> float:
    (m,) = tb.metric_families[name].series.values()
    return m.value()


def test_reuse_gives_the_same_tokens_and_reports_metrics(stub, llama_dir):
    from mgm_ref.config import MGMConfig

    cfg = MGMConfig.from_model_dir(llama_dir)
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    turns = [list(range(7, 7 + n)) for n in (20, 45, 70)]  # each turn extends the one before
    got = {}
    for reuse in ("false", "true"):
        model = start(
            "tensorrt_llm_cpu", tb.model_config("tensorrt_llm_cpu", **values(llama_dir, kv_cache_reuse=reuse))
        )
        try:
            got[reuse] = answers(model, [image_request(vocab, hidden, t) for t in turns])
            if reuse == "false":
                assert model.engine.prefix_cache is None and not any(
                    n.startswith("mgm_kv_cache") for n in tb.metric_families
                )
                continue
            pc = model.engine.prefix_cache
            assert pc.budget_bytes == 64 << 20 and model.engine.stats["reused_tokens"] >= 2 * 48
            assert metric("mgm_kv_cache_hit_blocks_total") == pc.stats["hit_blocks"] > 0
            assert metric("mgm_kv_cache_miss_blocks_total") == pc.stats["miss_blocks"] > 0
            assert metric("mgm_kv_cache_reused_tokens_total") == model.engine.stats["reused_tokens"]
            assert metric("mgm_kv_cache_bytes") == pc.bytes == pc.held_bytes() > 0
            assert metric("mgm_kv_cache_blocks") == len(pc) and metric("mgm_kv_cache_evicted_blocks_total") == 0
            assert (
                next(iter(tb.metric_families["mgm_kv_cache_bytes"].series.values())).labels["model"] == "tensorrt_llm"
            )
            # without extra ids, image rows are never reused (the same ids may be another image)
            before = model.engine.stats["reused_tokens"]
            answers(model, [image_request(vocab, hidden, turns[0], extra=False)])
            assert model.engine.stats["reused_tokens"] - before == 0
        finally:
            model.finalize()
    assert got["true"] == got["false"]


def test_bad_reuse_parameters_fail_the_load(stub, llama_dir):
    for edit, message in [({"kv_cache_reuse": "yes"}, "true or false"), ({"kv_cache_mb": "-1"}, ">= 0")]:
        with pytest.raises(ModelConfigError, match=message):
            start("tensorrt_llm_cpu", tb.model_config("tensorrt_llm_cpu", **values(llama_dir, **edit)))
    model = start("tensorrt_llm_cpu", tb.model_config("tensorrt_llm_cpu", **values(llama_dir, kv_cache_mb=0)))
    assert model.engine.prefix_cache is None  # a zero budget is reuse off
    model.finalize()


def params(text: str) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


def test_repo_flags_reach_the_tensorrt_llm_config(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    fake_vision(tmp_path / "eng", ckpt, "onnxruntime", dtype="float32")
    llm = tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt"
    build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu")
    p = params(llm.read_text())
    assert (p["enable_kv_cache_reuse"], p["kv_cache_mb"]) == ("true", str(DEFAULT_KV_CACHE_MB))
    build_repo(
        ckpt, tmp_path / "eng", tmp_path / "repo", "cpu", options=ServingOptions(kv_cache_reuse=False, kv_cache_mb=8)
    )
    p = params(llm.read_text())
    assert (p["enable_kv_cache_reuse"], p["kv_cache_mb"]) == ("false", "8")
    with pytest.raises(ValueError, match="kv_cache_mb"):
        ServingOptions(kv_cache_mb=-1)


def test_mgm_build_repo_parses_the_switches():
    import argparse

    from triton_models.repo_builder import add_repo_arguments

    parser = add_repo_arguments(argparse.ArgumentParser())
    base = ["--model_dir", "m", "--engine_dir", "e", "--output_dir", "o"]
    args = parser.parse_args(base)
    assert (args.kv_cache_reuse, args.kv_cache_mb) == ("on", DEFAULT_KV_CACHE_MB)
    args = parser.parse_args([*base, "--kv_cache_reuse", "off", "--kv_cache_mb", "16"])
    assert (args.kv_cache_reuse, args.kv_cache_mb) == ("off", 16)
