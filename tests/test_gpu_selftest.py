"""The GPU selftest, where it can run here: without TensorRT/TensorRT-LLM/the backend/a GPU it must say what
is missing and exit 2, not raise."""

from __future__ import annotations

import pytest

from client import gpu_selftest as S


def test_selftest_without_the_gpu_stack_names_what_is_missing(tmp_path, capsys):
    checks = {c.name: c for c in S.preflight(tmp_path)}
    if all(c.ok for c in checks.values()):
        pytest.skip("this host has the whole GPU stack; the selftest itself is the check")
    code = S.main(["--work_dir", str(tmp_path / "work"), "--backend_dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    assert "cannot run the GPU selftest here; missing:" in err and S.IMAGE in err
    assert not checks["tensorrtllm backend"].ok and "tensorrtllm backend" in err
    assert "preflight:" in out and "FAIL" in out
    assert not (tmp_path / "work" / "engines").exists()  # nothing was built


def test_reference_prefix_is_mgm_refs_greedy_answer_cut_at_a_low_margin(tiny_checkpoints):
    from mgm_ref.conversation import build_prompt
    from mgm_ref.loader import load_model
    from mgm_ref.model import GenerationParams

    ref = load_model(tiny_checkpoints("llama"))
    prefix = S.reference_prefix(ref, "Say something.", [])
    greedy = ref.generate(
        [ref.tokenize(build_prompt(ref.conv_mode, "Say something.", 0))],
        None,
        GenerationParams(max_new_tokens=S.MAX_TOKENS, temperature=0),
    )[0]
    assert prefix == greedy[: len(prefix)] and len(prefix) <= S.MAX_TOKENS
