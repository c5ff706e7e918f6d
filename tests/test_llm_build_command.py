"""The trtllm-build command line and the up-front refusals of `mgm-build llm` (fast: no quantization)."""

from __future__ import annotations

import argparse

import pytest

from build_engines import llm as L
from build_engines import llm_plan
from build_engines import quantize as Q
from build_engines import trtllm as T


def flags(argv: list[str]) -> dict[str, str | None]:
    out, i = {}, 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[argv[i]] = argv[i + 1]
            i += 2
        else:
            out[argv[i]] = None
            i += 1
    return out


def llm_args(model_dir, output_dir, *extra: str) -> argparse.Namespace:
    return L.add_llm_arguments(argparse.ArgumentParser()).parse_args(
        ["--model_dir", str(model_dir), "--output_dir", str(output_dir), *extra]
    )


# ---- max_multimodal_len / max_input_len ------------------------------------------------------------
@pytest.mark.parametrize(
    "tokens,batch,images,expected",
    [
        (576, 8, 1, 4608),  # LLaVA-style normal model: the TensorRT-LLM docs' 8 x 576
        (2880, 8, 1, 23040),  # MGM-HD: 4 crops + global view
        (576, 4, 2, 4608),  # two images per request
        (2880, 1, 1, 2880),
    ],
)
def test_max_multimodal_len(tokens, batch, images, expected):
    assert T.max_multimodal_len(batch, tokens, images) == expected
    limits = T.engine_limits(
        max_batch_size=batch, tokens_per_image=tokens, max_images_per_request=images, default_input_len=4096
    )
    assert limits.max_multimodal_len == expected


def test_max_input_len_counts_image_tokens():
    limits = T.engine_limits(max_batch_size=8, tokens_per_image=576, default_input_len=2048)
    assert (limits.max_input_len, limits.max_seq_len) == (2048, 2048 + T.DEFAULT_MAX_OUTPUT_LEN)
    with pytest.raises(ValueError, match="counts the image tokens"):
        T.engine_limits(max_batch_size=8, tokens_per_image=2880, max_input_len=2048)
    with pytest.raises(ValueError, match="counts the image tokens"):
        T.engine_limits(max_batch_size=1, tokens_per_image=576, max_input_len=1000, max_images_per_request=2)
    with pytest.raises(ValueError, match="must exceed"):
        T.engine_limits(max_batch_size=1, tokens_per_image=576, max_input_len=1024, max_seq_len=1024)
    big = T.engine_limits(max_batch_size=2, tokens_per_image=2880, max_input_len=9000)
    assert big.max_num_tokens == 9000  # one whole prompt must fit a context step


@pytest.mark.parametrize(
    "qformat,dtype,kv,gemm",
    [
        ("full_prec", "float16", None, "float16"),
        ("full_prec", "bfloat16", None, "bfloat16"),
        ("int4_awq", "bfloat16", None, "bfloat16"),
        ("int8_sq", "float16", "int8", "float16"),
        ("fp8", "float16", None, "auto"),
        ("fp8", "bfloat16", "fp8", "auto"),
    ],
)
def test_trtllm_build_argv_flags(qformat, dtype, kv, gemm):
    limits = T.engine_limits(max_batch_size=4, tokens_per_image=576, default_input_len=2048)
    argv = T.trtllm_build_argv("ckpt", "eng", limits, dtype=dtype, qformat=qformat, kv_cache_dtype=kv)
    f = flags(argv)
    assert argv[0] == "trtllm-build"
    assert f["--checkpoint_dir"] == "ckpt" and f["--output_dir"] == "eng"
    assert f["--max_multimodal_len"] == "2304"
    assert f["--max_batch_size"] == "4" and f["--max_input_len"] == "2048" and f["--max_seq_len"] == "2560"
    assert f["--gemm_plugin"] == gemm and f["--gpt_attention_plugin"] == dtype
    assert f["--kv_cache_type"] == "paged"
    assert f["--remove_input_padding"] == "enable" and f["--context_fmha"] == "enable"
    assert ("--use_fp8_context_fmha" in f) == (qformat == "fp8" and kv == "fp8")


def test_build_script_is_the_argv(tmp_path):
    limits = T.engine_limits(max_batch_size=8, tokens_per_image=2880, default_input_len=4096)
    argv = T.trtllm_build_argv("checkpoint", "engine", limits, dtype="float16", qformat="full_prec")
    script = T.write_build_script(tmp_path / "build_engine.sh", argv)
    text = script.read_text()
    body = text.split('cd "$(dirname "$0")"\n', 1)[1]
    assert body.replace("\\\n", " ").split() == argv
    assert "--max_multimodal_len 23040" in text and "trtllm-python-py3" in text


def test_container_image_from_dockerfile(tmp_path):
    assert T.container_image(tmp_path) == T.DEFAULT_IMAGE
    (tmp_path / "Dockerfile").write_text(
        "ARG TRITON=25.12\nFROM nvcr.io/nvidia/tritonserver:${TRITON}-trtllm-python-py3\n"
    )
    assert T.container_image(tmp_path) == "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"


# ---- unsupported combinations, refused before any weights are read --------------------------------
SHAPES = {
    "llama": Q.LLMShape("llama", 128, 256, 2, 4, 2, 32, 1024),
    "gemma": Q.LLMShape("gemma", 256, 512, 2, 4, 1, 64, 1024, tie_word_embeddings=True),
    "mixtral": Q.LLMShape("mixtral", 128, 256, 2, 4, 2, 32, 1024, num_experts=4),
    "vicuna-7b": Q.LLMShape("llama", 4096, 11008, 32, 32, 32, 128, 32000),
    "gemma-2b": Q.LLMShape("gemma", 2048, 16384, 18, 8, 1, 256, 256000, tie_word_embeddings=True),
    "mixtral-8x7b": Q.LLMShape("mixtral", 4096, 14336, 32, 32, 8, 128, 32000, num_experts=8),
}


@pytest.mark.parametrize("model", ["llama", "gemma", "mixtral", "vicuna-7b", "gemma-2b", "mixtral-8x7b"])
@pytest.mark.parametrize("qformat", Q.QFORMATS)
def test_support_matrix(model, qformat):
    shape = SHAPES[model]
    if qformat == "int8_sq" and shape.family == "mixtral":
        with pytest.raises(Q.UnsupportedCombination, match="not supported for Mixtral"):
            Q.check_combination(shape, qformat)
    else:
        Q.check_combination(shape, qformat)


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        (SHAPES["llama"], {"qformat": "int4_awq", "tp_size": 2}, r"o_proj=64.*down_proj=128|o_proj=64"),
        (SHAPES["vicuna-7b"], {"qformat": "int4_awq", "tp_size": 4}, r"down_proj=2752"),  # 11008 / 4
        (Q.LLMShape("llama", 96, 256, 2, 4, 2, 24, 1024), {"qformat": "int4_awq"}, r"q/k/v_proj=96"),
        (
            Q.LLMShape("gemma", 256, 512, 2, 4, 1, 64, 1000, tie_word_embeddings=True),
            {"qformat": "int4_awq"},
            r"vocab_size divisible by 64",
        ),
        (SHAPES["llama"], {"qformat": "int8_sq", "dtype": "bfloat16"}, r"float16"),
        (SHAPES["llama"], {"qformat": "fp8", "pp_size": 3}, r"not divisible by pp_size=3"),
        (SHAPES["llama"], {"qformat": "full_prec", "tp_size": 3}, r"num_attention_heads=4"),
        (SHAPES["mixtral"], {"qformat": "int8_sq", "tp_size": 3}, r"Mixtral.*\n.*num_attention_heads"),
    ],
)
def test_unsupported_combinations_say_why(shape, kwargs, match):
    with pytest.raises(Q.UnsupportedCombination, match=match):
        Q.check_combination(shape, **kwargs)


def test_awq_padded_vocab_is_a_warning_for_llama():
    warnings = Q.check_combination(Q.LLMShape("llama", 128, 256, 2, 4, 2, 32, 1000), "int4_awq")
    assert any("1000 -> 1024" in w for w in warnings)


def test_gemma_tp_replicates_its_single_kv_head():
    Q.check_combination(SHAPES["gemma"], "full_prec", tp_size=2)
    Q.check_combination(SHAPES["gemma"], "int4_awq", tp_size=2)  # 256 / 2 = 128 per rank: fine


def test_param_count_matches_transformers():
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        gemma = GemmaForCausalLM(
            GemmaConfig(
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=64,
                vocab_size=1024,
            )
        )
        mixtral = MixtralForCausalLM(
            MixtralConfig(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                vocab_size=1024,
            )
        )
    for model, shape in ((gemma, SHAPES["gemma"]), (mixtral, SHAPES["mixtral"])):
        unique = {id(p): p.numel() for p in model.parameters()}
        assert shape.param_count() == sum(unique.values())


# ---- the CLI refuses early ---------------------------------------------------------------------------
def test_plan_refuses_mixtral_int8_sq_before_loading(tiny_checkpoints, tmp_path, monkeypatch):
    import mgm_ref.loader

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the combination was checked")

    monkeypatch.setattr(mgm_ref.loader, "load_llm", boom)
    with pytest.raises(Q.UnsupportedCombination, match="int8_sq is not supported for Mixtral"):
        L.run_llm_build(
            llm_args(tiny_checkpoints("mixtral"), tmp_path / "out", "--qformat", "int8_sq"), log=lambda s: None
        )
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_build_without_trtllm_says_where_to_run(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "find_trtllm_build", lambda: None)
    with pytest.raises(L.LLMBuildError) as err:
        L.make_plan(llm_args(tiny_checkpoints("llama"), tmp_path / "out", "--build"), log=lambda s: None)
    msg = str(err.value)
    assert "nvcr.io/nvidia/tritonserver:" in msg and "trtllm-python-py3" in msg and "1.2" in msg
    assert "without --build" in msg


def test_plan_hd_defaults(tiny_checkpoints, tmp_path):
    plan = L.make_plan(llm_args(tiny_checkpoints("llama", hd=True), tmp_path / "out"), log=lambda s: None)
    assert plan.config.tokens_per_image == 2880
    assert (plan.limits.max_input_len, plan.limits.max_multimodal_len) == (4096, 8 * 2880)
    with pytest.raises(L.LLMBuildError, match="one image per request"):
        L.make_plan(
            llm_args(
                tiny_checkpoints("llama", hd=True),
                tmp_path / "o2",
                "--max_images_per_request",
                "2",
                "--max_input_len",
                "8000",
            ),
            log=lambda s: None,
        )


def test_plan_refuses_a_model_that_does_not_fit(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_plan, "host_available_bytes", lambda: 2**20)
    with pytest.raises(L.LLMBuildError, match="host memory"):
        L.make_plan(llm_args(tiny_checkpoints("llama"), tmp_path / "out"), log=lambda s: None)
