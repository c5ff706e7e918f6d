"""`mgm-build llm` on tiny MGM checkpoints (CPU): ModelOpt quantization, TensorRT-LLM checkpoint export,
tp/pp ranks, and the checkpoint's fidelity checked without TensorRT-LLM (weights mapped back to transformers).

The fidelity numbers are printed (run with -s to see them) and kept in the JUnit properties.

Over 400 lines: one file per command under test (`mgm-build llm`); the served tests are elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import stat

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")

from build_engines import llm as L
from build_engines import llm_calib
from build_engines import quantize as Q
from build_engines import trtllm_checkpoint as C
from mgm_ref.constants import IMAGE_TOKEN_INDEX
from mgm_ref.loader import load_llm, load_model
from mgm_runtime.numerics import rel_l2

pytestmark = pytest.mark.slow  # model builds and exports: seconds each (left out of `make test-fast`)

FAST = ["--calib_images", "off", "--calib_size", "4", "--calib_max_len", "48"]
SUPPORTED = [(f, q) for f in ("llama", "gemma", "mixtral") for q in Q.QFORMATS if (f, q) != ("mixtral", "int8_sq")]


def quiet(_message: str) -> None:
    pass


def llm_args(model_dir, output_dir, *extra: str) -> argparse.Namespace:
    return L.add_llm_arguments(argparse.ArgumentParser()).parse_args(
        ["--model_dir", str(model_dir), "--output_dir", str(output_dir), *extra]
    )


@pytest.fixture(scope="module")
def build(tiny_checkpoints, tmp_path_factory):
    """build(family, *cli_flags) -> LLMBuildResult, cached for the module."""
    cache = {}

    def get(family: str, *extra: str):
        key = (family, extra)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"llm-{family}")
            cache[key] = L.run_llm_build(llm_args(tiny_checkpoints(family), out, *extra), log=quiet)
        return cache[key]

    return get


# ---- every supported qformat x family exports --------------------------------------------------------
@pytest.mark.parametrize("family,qformat", SUPPORTED)
def test_export_matrix(build, family, qformat):
    res = build(family, "--qformat", qformat, *FAST)
    config = json.loads((res.checkpoint_dir / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == Q.QUANT_ALGO[qformat]
    assert (
        config["architecture"]
        == {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM", "mixtral": "MixtralForCausalLM"}[family]
    )
    assert sorted(p.name for p in res.checkpoint_dir.iterdir()) == ["config.json", "rank0.safetensors"]
    info = json.loads(res.build_info.read_text())
    assert info["quantization"]["qformat"] == qformat and info["tools"]["modelopt"] == Q.modelopt_version()
    assert info["source"]["architecture"].startswith("MGM") and len(info["source"]["config_sha256"]) == 64
    calib = info["quantization"]["calibration"]
    if qformat == "full_prec":
        assert calib is None
    else:
        assert calib["mode"] == "text" and calib["size"] == 4
    assert info["multimodal"]["prompt_table_vocab_offset"] == config["vocab_size"] == 1024
    assert info["multimodal"]["tokens_per_image"] == 576
    assert (info["multimodal"]["embedding_scale"] is not None) == (family == "gemma")
    assert set(info["timings_s"]) >= {"load_llm", "export", "command", "total"}
    assert (res.output_dir / "build_engine.sh").stat().st_mode & stat.S_IXUSR
    weights = C.load_ranks(res.checkpoint_dir)[0]
    dtype = {"full_prec": torch.float16, "fp8": torch.float8_e4m3fn, "int8_sq": torch.int8, "int4_awq": torch.int8}[
        qformat
    ]
    assert weights["transformer.layers.0.attention.qkv.weight"].dtype == dtype
    assert not any(".vision" in k or "mm_projector" in k or "vlm_uni" in k for k in weights)


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_kv_cache_quantization(build, kv):
    res = build("llama", "--qformat", "full_prec", "--kv_cache_dtype", kv, *FAST)
    config = json.loads((res.checkpoint_dir / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] == kv.upper()
    assert config["quantization"]["quant_algo"] is None
    assert "transformer.layers.0.attention.kv_cache_scaling_factor" in C.load_ranks(res.checkpoint_dir)[0]


def test_multimodal_calibration_uses_projector_rows(build):
    res = build("llama", "--qformat", "fp8", "--calib_size", "2", "--calib_num_images", "1")
    calib = res.info["quantization"]["calibration"]
    assert calib["mode"] == "multimodal" and "real projector outputs" in calib["reason"]
    assert calib["tokens_min"] > 576  # every sample carries one image's 576 rows


def test_calibration_splices_image_rows_like_mgm_ref(tiny_checkpoints):
    """The calibration forward feeds the LLM exactly what mgm_ref's splice feeds it."""
    model = load_model(tiny_checkpoints("gemma"), torch.float32, "cpu")
    calib = llm_calib.build_calibration_set(
        tiny_checkpoints("gemma"), model.config, model.tokenizer, 1, num_images=1, dtype=torch.float32, log=quiet
    )
    sample = calib.samples[0]
    assert sample.ids.count(IMAGE_TOKEN_INDEX) == 1 and calib.conv_mode == "gemma"
    ours = llm_calib.splice_embeddings(model.llm, sample.ids, calib.image_features[0])
    # built by hand: the text rows of the embedding table around the image's rows, at the tag
    table, tag = model.llm.get_input_embeddings().weight, sample.ids.index(IMAGE_TOKEN_INDEX)
    expected = torch.cat([table[sample.ids[:tag]], calib.image_features[0], table[sample.ids[tag + 1 :]]])
    assert torch.equal(ours, expected[None])


def test_bad_image_dir_falls_back_to_text_only_and_says_why(tiny_checkpoints, tmp_path):
    from mgm_ref.config import MGMConfig
    from mgm_ref.loader import load_tokenizer

    path = tiny_checkpoints("llama")
    calib = llm_calib.build_calibration_set(
        path, MGMConfig.from_model_dir(path), load_tokenizer(path), 2, image_dir=tmp_path, log=quiet
    )
    assert calib.mode == "text" and "vision path is unavailable" in calib.reason
    with pytest.raises(ValueError, match="no .jpg"):
        llm_calib.build_calibration_set(
            path,
            MGMConfig.from_model_dir(path),
            load_tokenizer(path),
            2,
            mode="multimodal",
            image_dir=tmp_path,
            log=quiet,
        )


def test_auto_calibration_falls_back_only_for_a_missing_vision_path(tiny_checkpoints, monkeypatch):
    """A checkpoint without vision weights -> text only, said; any other failure is a bug and is raised."""
    from mgm_ref import loader
    from mgm_ref.config import MGMConfig
    from mgm_ref.errors import CheckpointError
    from mgm_ref.loader import load_tokenizer

    path = tiny_checkpoints("llama")
    args = (path, MGMConfig.from_model_dir(path), load_tokenizer(path), 2)
    monkeypatch.setattr(loader, "load_vision", lambda *a, **k: (_ for _ in ()).throw(CheckpointError("no CLIP")))
    calib = llm_calib.build_calibration_set(*args, log=quiet)
    assert calib.mode == "text" and "CheckpointError: no CLIP" in calib.reason
    monkeypatch.setattr(loader, "load_vision", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):
        llm_calib.build_calibration_set(*args, log=quiet)


# ---- tensor / pipeline parallel ranks -------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,tp,pp", [("llama", 2, 1), ("llama", 1, 2), ("llama", 2, 2), ("gemma", 2, 1), ("mixtral", 2, 2)]
)
def test_parallel_ranks(build, family, tp, pp):
    full = build(family, "--qformat", "full_prec")
    res = build(family, "--qformat", "full_prec", "--tp_size", str(tp), "--pp_size", str(pp))
    config = json.loads((res.checkpoint_dir / "config.json").read_text())
    assert config["mapping"]["tp_size"] == tp and config["mapping"]["pp_size"] == pp
    assert config["mapping"]["world_size"] == tp * pp
    assert sorted(p.name for p in res.checkpoint_dir.glob("rank*")) == [f"rank{r}.safetensors" for r in range(tp * pp)]
    ranks = C.load_ranks(res.checkpoint_dir, config)
    # pipeline stages: embedding on the first, final norm + lm_head on the last, layers split evenly
    for rank, tensors in enumerate(ranks):
        stage = rank // tp
        assert ("transformer.vocab_embedding.weight" in tensors) == (stage == 0)
        assert ("transformer.ln_f.weight" in tensors) == (stage == pp - 1)
        assert {int(k.split(".")[2]) for k in tensors if k.startswith("transformer.layers.")} == set(range(2 // pp))
    reference = C.load_ranks(full.checkpoint_dir)[0]
    merged = C.merge_ranks(ranks, config)
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.parametrize("qformat,tp,pp", [("fp8", 2, 2), ("int8_sq", 2, 1)])
def test_quantized_ranks_dequantize_to_the_single_rank_checkpoint(build, qformat, tp, pp):
    """Scales travel with their shards: per-tensor scales are replicated, per-channel ones split like weights."""
    _, single = C.load_merged(build("llama", "--qformat", qformat, *FAST).checkpoint_dir)
    res = build("llama", "--qformat", qformat, "--tp_size", str(tp), "--pp_size", str(pp), *FAST)
    _, merged = C.load_merged(res.checkpoint_dir)
    assert merged.keys() == single.keys()
    for name, tensor in single.items():
        assert torch.equal(merged[name], tensor), name


def test_concatenated_tp_shards_are_the_full_weights(build):
    """Independent of merge_ranks: plain torch.cat of the two tp=2 shards gives back the tp=1 tensors."""
    full = C.load_ranks(build("llama", "--qformat", "full_prec").checkpoint_dir)[0]
    r0, r1 = C.load_ranks(build("llama", "--qformat", "full_prec", "--tp_size", "2", "--pp_size", "1").checkpoint_dir)
    p = "transformer.layers.1."
    assert torch.equal(
        torch.cat([r0[p + "attention.dense.weight"], r1[p + "attention.dense.weight"]], 1),
        full[p + "attention.dense.weight"],
    )  # row parallel
    assert torch.equal(
        torch.cat([r0[p + "mlp.proj.weight"], r1[p + "mlp.proj.weight"]], 1), full[p + "mlp.proj.weight"]
    )
    for name in ("mlp.fc.weight", "mlp.gate.weight"):  # column parallel
        assert torch.equal(torch.cat([r0[p + name], r1[p + name]], 0), full[p + name])
    q, kv = 2 * 32, 1 * 32  # per rank: 2 of 4 query heads, 1 of 2 KV heads
    split = [t[p + "attention.qkv.weight"].split([q, kv, kv]) for t in (r0, r1)]
    assert torch.equal(
        torch.cat([split[0][0], split[1][0], split[0][1], split[1][1], split[0][2], split[1][2]]),
        full[p + "attention.qkv.weight"],
    )
    for name in ("transformer.vocab_embedding.weight", "lm_head.weight"):  # vocab parallel
        assert torch.equal(torch.cat([r0[name], r1[name]], 0), full[name])
    assert torch.equal(r0[p + "input_layernorm.weight"], full[p + "input_layernorm.weight"])  # replicated
    assert torch.equal(r1[p + "input_layernorm.weight"], full[p + "input_layernorm.weight"])


def test_cli_rewrites_ranks_and_runs_trtllm_build_when_present(tiny_checkpoints, tmp_path, monkeypatch):
    """A stale rank from an earlier tp=2 export is removed; with --build the written argv is what runs."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    tool = fake_bin / "trtllm-build"
    tool.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > called_with.txt\nmkdir -p engine\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    L.run_llm_build(llm_args(tiny_checkpoints("llama"), out, "--tp_size", "2"), log=quiet)
    res = L.run_llm_build(llm_args(tiny_checkpoints("llama"), out, "--build", "--max_batch_size", "2"), log=quiet)
    assert sorted(p.name for p in res.checkpoint_dir.iterdir()) == ["config.json", "rank0.safetensors"]
    assert res.built and res.info["engine"]["built"]
    assert (out / "called_with.txt").read_text().split() == res.argv[1:]
    assert "--max_multimodal_len" in res.argv and res.argv[res.argv.index("--max_multimodal_len") + 1] == "1152"


# ---- fidelity without TensorRT-LLM ----------------------------------------------------------------------
def _ids(seed=1):
    return torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma", "mixtral"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_full_prec_checkpoint_reproduces_logits(build, tiny_checkpoints, family, tp, pp, record_property):
    res = build(family, "--qformat", "full_prec", "--tp_size", str(tp), "--pp_size", str(pp))
    original, _, cfg = load_llm(tiny_checkpoints(family), torch.float16, "cpu")
    config, merged = C.load_merged(res.checkpoint_dir)
    rebuilt16 = C.build_hf_model(merged, config, cfg.llm_config, torch.float16)
    rebuilt32 = C.build_hf_model(merged, config, cfg.llm_config, torch.float32)
    with torch.no_grad():
        ref16, got16 = original(_ids()).logits, rebuilt16(_ids()).logits
        ref32, got32 = original.float()(_ids()).logits, rebuilt32(_ids()).logits
    err16, err32 = (got16 - ref16).abs().max().item(), (got32 - ref32).abs().max().item()
    print(f"\nfull_prec {family} tp={tp} pp={pp}: max|dlogit| fp16 {err16:.3g}, fp32 {err32:.3g}")
    record_property("max_abs_diff", [err16, err32])
    assert err16 == 0.0 and err32 == 0.0


def share_fused_scales(model, family):
    """Give ModelOpt's fake-quantized model the scale sharing its TensorRT-LLM export applies: q/k/v become one
    GEMM (one pre-quant scale: re-smoothed onto the mean; one per-tensor weight and input scale); gate/up and
    each expert's w1/w3 share a per-tensor weight scale; Mixtral's experts share one input scale."""
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    def share_weight_amax(mods):
        amaxes = [m.weight_quantizer.amax for m in mods]
        if mods[0].weight_quantizer.is_enabled and amaxes[0] is not None and amaxes[0].numel() == 1:
            for m in mods:
                m.weight_quantizer.amax = torch.stack(amaxes).max()

    for layer in model.model.layers:
        attn = layer.self_attn
        preprocess_linear_fusion([attn.q_proj, attn.k_proj, attn.v_proj])
        if family != "mixtral":
            share_weight_amax([layer.mlp.gate_proj, layer.mlp.up_proj])
            continue
        experts = layer.block_sparse_moe.experts
        for expert in experts:
            share_weight_amax([expert.w1, expert.w3])
        for names in (("w1", "w3"), ("w2",)):
            mods = [getattr(e, n) for e in experts for n in names]
            if mods[0].input_quantizer.is_enabled and mods[0].input_quantizer.amax is not None:
                amax = torch.stack([m.input_quantizer.amax for m in mods]).max()
                for m in mods:
                    m.input_quantizer.amax = amax


@pytest.mark.parametrize(
    "family,qformat",
    [
        ("llama", "fp8"),
        ("gemma", "fp8"),
        ("mixtral", "fp8"),
        ("llama", "int8_sq"),
        ("gemma", "int8_sq"),
        ("llama", "int4_awq"),
    ],
)
def test_quantized_checkpoint_matches_modelopt_fake_quant(tiny_checkpoints, tmp_path, family, qformat, record_property):
    """Dequantize the exported weights, emulate the engine's activation quantization with the exported
    scales, and compare logits with ModelOpt's fake-quantized model (fp32 on both sides)."""
    path = tiny_checkpoints(family)
    llm, tokenizer, cfg = load_llm(path, torch.float16, "cpu")
    ids = _ids()
    with torch.no_grad():
        original = copy.deepcopy(llm).float()(ids).logits
    calib = llm_calib.build_calibration_set(path, cfg, tokenizer, 8, mode="text", max_len=64, log=quiet)
    Q.quantize(llm, qformat, None, llm_calib.make_forward_loop(calib), family)
    fake = copy.deepcopy(llm).float()
    shared = copy.deepcopy(llm)
    share_fused_scales(shared, family)  # in the model's 16-bit dtype, as the export does it
    shared = shared.float()
    with torch.no_grad():
        ref_fake, ref_shared = fake(ids).logits, shared(ids).logits
    Q.export_checkpoint(llm, family, "float16", tmp_path, qformat=qformat)
    config, merged = C.load_merged(tmp_path)
    rebuilt = C.build_hf_model(merged, config, cfg.llm_config, torch.float32)
    C.add_activation_quant_hooks(rebuilt, merged, config)
    with torch.no_grad():
        got = rebuilt(ids).logits
    errors = {
        "vs_fake_quant": rel_l2(got, ref_fake),
        "vs_fake_quant_shared_scales": rel_l2(got, ref_shared),
        "fake_quant_vs_original": rel_l2(ref_fake, original),
        "max_abs_vs_fake_quant": (got - ref_fake).abs().max().item(),
        "max_abs_vs_shared": (got - ref_shared).abs().max().item(),
        "logit_scale": ref_fake.abs().max().item(),
        "argmax_agree_vs_fake_quant": (got.argmax(-1) == ref_fake.argmax(-1)).float().mean().item(),
    }
    # Weight by weight: with the fused scales shared, the exported codes equal ModelOpt's fake-quant codes
    # except at exact rounding ties (x/s halfway between two codes: torch's casts and rounding, used by the
    # export, go half-to-even; ModelOpt's fake quant goes half-away-from-zero). bf16 checkpoints hit ties.
    if qformat != "int4_awq":
        exported = C.to_hf_state_dict(merged, config)
        modules = dict(shared.named_modules())
        ties = total = 0
        for name in C.hf_linear_sources(config):
            module = modules[name]
            with torch.no_grad():
                w = module.weight.detach()
                fq = module.weight_quantizer(w)
            ex = exported[name + ".weight"]
            differ = (fq - ex).abs() > 1e-6 * w.abs().max()
            midpoint = (fq + ex) / 2
            assert torch.allclose(midpoint[differ], w[differ], rtol=1e-5, atol=1e-9), name
            ties, total = ties + int(differ.sum()), total + w.numel()
        errors["weight_codes_at_ties"] = ties / total
    print(f"\n{qformat} {family}: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    record_property("errors", errors)
    # The export's departures from the fake-quant model: shared fused scales (removed in ref_shared), the
    # rounding of ties, and for AWQ a re-smoothing of q/k/v and gate/up onto one pre-quant scale. Together they
    # stay below the quantization error itself.
    assert errors["vs_fake_quant"] < 1.5 * errors["fake_quant_vs_original"]
    if qformat == "int4_awq":  # no ties to explain: resmoothing is the only difference
        assert errors["vs_fake_quant_shared_scales"] < 0.1 * errors["fake_quant_vs_original"]
    else:
        assert errors["vs_fake_quant_shared_scales"] < errors["fake_quant_vs_original"]
        assert errors["weight_codes_at_ties"] < 0.01
    if (family, qformat) == ("llama", "fp8"):  # no ties hit on this model: the emulation is exact
        assert errors["weight_codes_at_ties"] == 0 and errors["max_abs_vs_shared"] < 1e-5


# ---- Gemma: sqrt(hidden) applies to prompt-table rows as HF applies it to inputs_embeds ---------------------
def test_gemma_prompt_table_rows_get_the_same_sqrt_hidden_scaling(build, tiny_checkpoints):
    """Emulate the engine's input: fake ids vocab_size.. look up the (raw) projector rows in the prompt table,
    the model multiplies every row by sqrt(hidden) (TensorRT-LLM gemma/model.py does it after the lookup; HF's
    GemmaModel does it to inputs_embeds). The result equals mgm_ref's logits; pre-scaled rows would not."""
    path = tiny_checkpoints("gemma")
    res = build("gemma", "--qformat", "full_prec")
    model = load_model(path, torch.float32, "cpu")
    model.llm = load_llm(path, torch.float16, "cpu")[0].float()  # the weights as the fp16 checkpoint holds them
    feats = model.image_features(llm_calib.synthetic_images(1))  # (1, 576, H) raw projector output
    prompt = llm_calib.conversation_texts(model.conv_mode, 1, with_image=True)[0]
    ids = model.tokenize(prompt)
    reference = model.logits([ids], feats)[0]  # mgm_ref: splice + HF Gemma

    config, merged = C.load_merged(res.checkpoint_dir)
    engine_llm = C.build_hf_model(merged, config, model.config.llm_config, torch.float32)
    vocab = res.info["multimodal"]["prompt_table_vocab_offset"]
    pos = ids.index(IMAGE_TOKEN_INDEX)
    fake_ids = torch.tensor(ids[:pos] + list(range(vocab, vocab + feats.shape[1])) + ids[pos + 1 :])
    table = feats.reshape(-1, feats.shape[-1])
    embedding = merged["transformer.vocab_embedding.weight"]

    def logits(rows):
        emb = C.prompt_table_embeddings(fake_ids, embedding, rows, vocab).unsqueeze(0)
        with torch.no_grad():
            return engine_llm(inputs_embeds=emb).logits[0]

    normalizer = engine_llm.model.config.hidden_size**0.5
    err = (logits(table) - reference).abs().max().item()
    wrong = (logits(table * normalizer) - reference).abs().max().item()
    print(
        f"\ngemma prompt table: max|dlogit| {err:.3g} with raw rows, {wrong:.3g} with rows pre-scaled by "
        f"sqrt({engine_llm.model.config.hidden_size})"
    )
    assert err < 1e-4
    assert wrong > 100 * max(err, 1e-6)
    assert res.info["multimodal"]["embedding_scale"].startswith("sqrt(hidden_size)")

    # Not the prompt table, but the other Gemma difference an engine brings: the exported hidden_act "gelu"
    # runs as TensorRT-LLM's tanh approximation while MGM-2B (and mgm_ref) use the exact erf GELU.
    assert json.loads((res.checkpoint_dir / "config.json").read_text())["hidden_act"] == "gelu"
    assert any("tanh-approximated gelu" in w for w in res.info["warnings"])
    tanh_config = copy.deepcopy(model.config.llm_config)
    tanh_config.hidden_activation = tanh_config.hidden_act = "gelu_pytorch_tanh"
    engine_llm = C.build_hf_model(merged, config, tanh_config, torch.float32)
    tanh_err = (logits(table) - reference).abs().max().item()
    print(
        f"gemma tanh-GELU (TensorRT-LLM gelu) vs exact GELU: max|dlogit| {tanh_err:.3g} "
        f"(logits up to {reference.abs().max().item():.3g})"
    )
    assert 0 < tanh_err < 0.05 * reference.abs().max().item()


def test_calibration_truncates_the_spliced_sequence(tiny_checkpoints):
    """--calib_max_len below the image rows cuts the spliced sequence (as MGM truncates), not the text ids."""
    path = tiny_checkpoints("llama")
    model = load_model(path, torch.float32, "cpu")
    calib = llm_calib.build_calibration_set(
        path, model.config, model.tokenizer, 2, num_images=1, max_len=100, dtype=torch.float32, log=quiet
    )
    assert calib.mode == "multimodal" and calib.stats["truncated"] == 2 and calib.stats["tokens_max"] == 100
    seen = []
    handle = model.llm.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    llm_calib.make_forward_loop(calib)(model.llm)
    handle.remove()
    assert seen == [100, 100]


def test_a_folder_that_is_not_a_checkpoint_is_a_user_error(tmp_path):
    from mgm_ref.errors import MGMError

    with pytest.raises(MGMError, match="no config.json"):  # the CLIs print MGMErrors as one line, no traceback
        C.read_config(tmp_path)
