"""mgm-build repo: templates filled completely for cpu and gpu, with clear errors for missing engines."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from mgm_ref.errors import CheckpointError
from mgm_runtime.contract import ContractError, read_llm_contract
from tests.helpers.repo_fixtures import fake_llm_engine, fake_vision
from triton_models.repo_builder import (
    DEFAULT_IMAGE_CACHE_MB,
    ServingOptions,
    add_repo_arguments,
    build_repo,
    run_repo_build,
)


def configs(repo):
    return {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}


def test_cpu_repo_is_complete(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama", hd=True)
    cfg = fake_vision(tmp_path / "eng", ckpt, "onnxruntime", dtype="float32")
    repo = build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu", max_batch_size=4)
    texts = configs(repo)
    assert sorted(texts) == ["ensemble", "mgm_bls", "postprocessing", "preprocessing", "tensorrt_llm", "vision_encoder"]
    assert not any("${" in t for t in texts.values())
    assert 'backend: "python"' in texts["tensorrt_llm"] and "max_batch_size: 4" in texts["tensorrt_llm"]
    # images reach vision_encoder encoded; its feature cache has the default budget
    assert 'name: "IMAGE_BYTES", data_type: TYPE_UINT8' in texts["vision_encoder"]
    assert f'"image_cache_mb" value: {{ string_value: "{DEFAULT_IMAGE_CACHE_MB}" }}' in texts["vision_encoder"]
    # the CPU LLM declares prompt_table_extra_ids, so the ensemble and the BLS pass the image keys on
    assert 'input_map { key: "prompt_table_extra_ids" value: "_PROMPT_TABLE_EXTRA_IDS" }' in texts["ensemble"]
    assert '"llm_takes_extra_ids" value: { string_value: "true" }' in texts["mgm_bls"]
    assert f'"vocab_offset" value: {{ string_value: "{cfg.vocab_size}" }}' in texts["preprocessing"]
    assert (repo / "ensemble" / "1").is_dir() and (repo / "tensorrt_llm" / "1" / "model.py").is_file()


def test_gpu_repo_uses_tensorrtllm_and_the_engine_vocab_offset(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    cfg = fake_vision(eng, ckpt, "tensorrt")
    with pytest.raises(CheckpointError, match="no llm/engine/config.json"):
        build_repo(ckpt, eng, tmp_path / "repo", "gpu")
    fake_llm_engine(eng, cfg, vocab_offset=1088)
    texts = configs(build_repo(ckpt, eng, tmp_path / "repo", "gpu"))
    assert 'backend: "tensorrtllm"' in texts["tensorrt_llm"]
    assert re.search(r'"gpt_model_path" value: \{ string_value: ".*/llm/engine" \}', texts["tensorrt_llm"])
    assert (
        "data_type: TYPE_FP16" in texts["vision_encoder"] and not (tmp_path / "repo/tensorrt_llm/1/model.py").exists()
    )
    assert '"vocab_offset" value: { string_value: "1088" }' in texts["preprocessing"]
    # this GPU template does not declare prompt_table_extra_ids (yet): nothing may map to it
    if 'name: "prompt_table_extra_ids"' not in texts["tensorrt_llm"]:
        assert 'prompt_table_extra_ids" value' not in texts["ensemble"]
        assert '"llm_takes_extra_ids" value: { string_value: "false" }' in texts["mgm_bls"]


def test_image_cache_budget_reaches_vision_encoder(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    fake_vision(tmp_path / "eng", ckpt, "onnxruntime", dtype="float32")
    args = add_repo_arguments(argparse.ArgumentParser()).parse_args(
        ["--model_dir", str(ckpt), "--engine_dir", str(tmp_path / "eng"), "--output_dir", str(tmp_path / "repo")]
        + ["--image_cache_mb", "0"]
    )
    texts = configs(run_repo_build(args))
    assert '"image_cache_mb" value: { string_value: "0" }' in texts["vision_encoder"]
    with pytest.raises(ValueError, match="image_cache_mb"):
        ServingOptions(image_cache_mb=-1)


def test_the_offset_mgm_build_llm_records_reaches_preprocessing(tiny_checkpoints, tmp_path):
    """build_info.json keeps the (padded) first fake id under "contract"; a top-level key is not read."""
    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    cfg = fake_vision(eng, ckpt, "tensorrt")
    fake_llm_engine(eng, cfg, vocab_offset=1088)
    info = json.loads((eng / "llm" / "build_info.json").read_text())
    info["prompt_table_vocab_offset"] = 5  # a stray top-level key must not win over the contract
    (eng / "llm" / "build_info.json").write_text(json.dumps(info))
    texts = configs(build_repo(ckpt, eng, tmp_path / "repo", "gpu"))
    assert '"vocab_offset" value: { string_value: "1088" }' in texts["preprocessing"]


def test_build_info_without_a_contract_is_refused(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    fake_vision(eng, ckpt, "tensorrt")
    (eng / "llm" / "engine").mkdir(parents=True)
    (eng / "llm" / "engine" / "config.json").write_text("{}")
    (eng / "llm" / "build_info.json").write_text(json.dumps({"prompt_table_vocab_offset": 1088}))
    with pytest.raises(ContractError, match='no "contract" block'):
        build_repo(ckpt, eng, tmp_path / "repo", "gpu")


@pytest.mark.parametrize(
    "option,value",
    [("max_batch_size", 16), ("max_input_len", 4096), ("max_seq_len", 9000), ("max_images_per_request", 2)],
)
def test_an_override_above_the_engine_is_refused_naming_both_numbers(tiny_checkpoints, tmp_path, option, value):
    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    contract = fake_llm_engine(eng, fake_vision(eng, ckpt, "tensorrt"))
    with pytest.raises(ContractError, match=f"--{option} {value} exceeds the {getattr(contract, option)} "):
        build_repo(ckpt, eng, tmp_path / "repo", "gpu", **{option: value})


def test_lower_overrides_keep_the_per_request_table_limit(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    cfg = fake_vision(eng, ckpt, "tensorrt")
    built = fake_llm_engine(eng, cfg, max_batch_size=8, max_images_per_request=3, max_input_len=4096)
    repo = build_repo(ckpt, eng, tmp_path / "repo", "gpu", max_batch_size=2, max_input_len=3000)
    served = read_llm_contract(repo / "tensorrt_llm" / "contract.json")
    assert (served.max_batch_size, served.max_input_len, served.max_seq_len) == (2, 3000, built.max_seq_len)
    assert served.rows_per_request == built.rows_per_request == 3 * cfg.tokens_per_image
    assert "max_batch_size: 2" in configs(repo)["tensorrt_llm"]


def test_unused_template_values_are_an_error(tiny_checkpoints, tmp_path, monkeypatch):
    from triton_models import repo_builder as R

    ckpt = tiny_checkpoints("llama")
    fake_vision(tmp_path / "eng", ckpt, "onnxruntime")
    real = R.template_values
    monkeypatch.setattr(R, "template_values", lambda *a: {**real(*a), "max_imgaes_per_request": 2})
    with pytest.raises(ValueError, match="max_imgaes_per_request"):
        build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu")


def test_missing_or_mismatched_vision_artifact(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    with pytest.raises(CheckpointError, match="mgm-build vision"):
        build_repo(ckpt, tmp_path / "none", tmp_path / "repo", "cpu")
    fake_vision(tmp_path / "eng", tiny_checkpoints("gemma"), "onnxruntime")
    with pytest.raises(CheckpointError, match="rebuild the vision engine"):
        build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu")
    with pytest.raises(CheckpointError, match="needs one of"):
        build_repo(tiny_checkpoints("gemma"), tmp_path / "eng", tmp_path / "repo", "gpu")


def test_a_contract_whose_images_do_not_fit_its_table_is_refused():
    from mgm_runtime.contract import LLMContract, derive_limits

    limits = derive_limits(max_batch_size=4, tokens_per_image=576, max_images_per_request=2, max_input_len=2048)
    ok = LLMContract(runtime="tensorrt_llm", dtype="bfloat16", hidden_size=64, vocab_offset=1024, **limits)
    assert ok.rows_per_request == 1152 and ok.prompt_table_type == "TYPE_BF16"
    with pytest.raises(ContractError, match="3 images x 576 rows exceed the 1152 prompt-table rows"):
        LLMContract(**{**ok.__dict__, "max_images_per_request": 3})
    with pytest.raises(ContractError, match="dtype 'float8'"):
        LLMContract(**{**ok.__dict__, "dtype": "float8"})


def test_cpu_repo_gets_as_many_images_as_fit_and_the_engine_formula(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    cfg = fake_vision(tmp_path / "eng", ckpt, "onnxruntime", dtype="float32")
    repo = build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu")
    c = read_llm_contract(repo / "tensorrt_llm" / "contract.json")
    assert c.max_images_per_request == min(4, (cfg.max_length - 1) // cfg.tokens_per_image) == 3
    assert c.max_seq_len == c.max_input_len + 512 and c.dtype == "float32" and c.max_batch_size == 8


def test_a_vision_artifact_for_other_pixel_sizes_is_refused(tiny_checkpoints, tmp_path):
    """vision_encoder makes the pixels from the checkpoint's config, so the artifact must take those."""
    ckpt = tiny_checkpoints("llama")
    fake_vision(tmp_path / "eng", ckpt, "onnxruntime", dtype="float32")
    path = tmp_path / "eng" / "vision" / "config.json"
    art = json.loads(path.read_text())
    art["inputs"][1]["per_image_shape"] = [3, 512, 512]
    path.write_text(json.dumps(art))
    with pytest.raises(CheckpointError, match=r"images_aux \[3, 512, 512\].*rebuild the vision engine"):
        build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu")


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_no_model_holds_a_lone_request_for_batch_mates_unless_asked(tiny_checkpoints, tmp_path, backend):
    """A batching delay is paid at every hop of an answer (preprocessing, vision, LLM): it defaults to 0."""
    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    if backend == "cpu":
        fake_vision(eng, ckpt, "onnxruntime", dtype="float32")
    else:
        fake_llm_engine(eng, fake_vision(eng, ckpt, "tensorrt"))

    def delays(options):
        texts = configs(build_repo(ckpt, eng, tmp_path / "repo", backend, options=options))
        return {m: re.findall(r"max_queue_delay_microseconds: (\d+)", t) for m, t in texts.items()}

    batched = ["postprocessing", "preprocessing", "tensorrt_llm", "vision_encoder"]
    got = delays(ServingOptions())
    assert {m: got[m] for m in batched} == dict.fromkeys(batched, ["0"])
    got = delays(ServingOptions(max_queue_delay_microseconds=250))
    assert {m: got[m] for m in batched} == dict.fromkeys(batched, ["250"])
    assert got["mgm_bls"] == ["0"]  # its async execute takes every request at once
    with pytest.raises(ValueError, match="max_queue_delay_microseconds"):
        ServingOptions(max_queue_delay_microseconds=-1)
