"""mgm-build repo: templates filled completely for cpu and gpu, with clear errors for missing engines."""

from __future__ import annotations

import json
import re

import pytest

from mgm_ref.config import MGMConfig
from mgm_ref.errors import CheckpointError
from triton_models.repo_builder import build_repo


def fake_vision(engine_dir, ckpt, backend):
    cfg = MGMConfig.from_model_dir(ckpt)
    (engine_dir / "vision").mkdir(parents=True)
    (engine_dir / "vision" / "config.json").write_text(json.dumps(
        {"backend": backend, "tokens_per_image": cfg.tokens_per_image, "hidden_size": cfg.hidden_size}))
    return cfg


def configs(repo):
    return {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}


def test_cpu_repo_is_complete(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama", hd=True)
    cfg = fake_vision(tmp_path / "eng", ckpt, "onnxruntime")
    repo = build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu", max_batch_size=4)
    texts = configs(repo)
    assert sorted(texts) == ["ensemble", "mgm_bls", "postprocessing", "preprocessing", "tensorrt_llm", "vision_encoder"]
    assert not any("${" in t for t in texts.values())
    assert 'backend: "python"' in texts["tensorrt_llm"] and "max_batch_size: 4" in texts["tensorrt_llm"]
    assert "dims: [ -1, 5, 3, 336, 336 ]" in texts["vision_encoder"]
    assert f'"vocab_offset" value: {{ string_value: "{cfg.vocab_size}" }}' in texts["preprocessing"]
    assert (repo / "ensemble" / "1").is_dir() and (repo / "tensorrt_llm" / "1" / "model.py").is_file()


def test_gpu_repo_uses_tensorrtllm_and_the_engine_vocab_offset(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    fake_vision(eng, ckpt, "tensorrt")
    with pytest.raises(CheckpointError, match="no llm/engine/config.json"):
        build_repo(ckpt, eng, tmp_path / "repo", "gpu")
    (eng / "llm" / "engine").mkdir(parents=True)
    (eng / "llm" / "engine" / "config.json").write_text("{}")
    (eng / "llm" / "build_info.json").write_text(json.dumps({"prompt_table_vocab_offset": 1088}))
    texts = configs(build_repo(ckpt, eng, tmp_path / "repo", "gpu"))
    assert 'backend: "tensorrtllm"' in texts["tensorrt_llm"]
    assert re.search(r'"gpt_model_path" value: \{ string_value: ".*/llm/engine" \}', texts["tensorrt_llm"])
    assert "data_type: TYPE_FP16" in texts["vision_encoder"] and not (tmp_path / "repo/tensorrt_llm/1/model.py").exists()
    assert '"vocab_offset" value: { string_value: "1088" }' in texts["preprocessing"]


def test_missing_or_mismatched_vision_artifact(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("llama")
    with pytest.raises(CheckpointError, match="mgm-build vision"):
        build_repo(ckpt, tmp_path / "none", tmp_path / "repo", "cpu")
    fake_vision(tmp_path / "eng", tiny_checkpoints("gemma"), "onnxruntime")
    with pytest.raises(CheckpointError, match="rebuild the vision engine"):
        build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "cpu")
    with pytest.raises(CheckpointError, match="needs one of"):
        build_repo(tiny_checkpoints("gemma"), tmp_path / "eng", tmp_path / "repo", "gpu")
