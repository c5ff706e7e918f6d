"""mgm_ref language side: templates, tokenization, loader round trips, splicing, generation, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from mgm_ref.config import MGMConfig
from mgm_ref.constants import IMAGE_TOKEN_INDEX
from mgm_ref.conversation import build_prompt, default_conv_mode, get_template
from mgm_ref.errors import CheckpointError, ImageError, MGMError, PromptError
from mgm_ref.loader import load_model, official_to_vision_key
from mgm_ref.model import MGM, GenerationParams
from mgm_ref.preprocess import load_image
from mgm_ref.tiny import build_tiny
from mgm_ref.tokenization import tokenizer_image_token
from tests.helpers.images import random_image

pytestmark = pytest.mark.slow  # model builds and exports: seconds each (left out of `make test-fast`)

Q = "What is in the picture?"


# ---- templates ---------------------------------------------------------------------------------
def test_template_strings_for_each_family():
    assert build_prompt("vicuna_v1", Q) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the picture? ASSISTANT:"
    )
    assert build_prompt("gemma", Q) == (
        "<start_of_turn>user\n<image>\nWhat is in the picture?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert build_prompt("llama_3", Q) == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
        "able to understand the visual content that the user provides, and assist the user with a variety of tasks "
        "using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the "
        "picture?<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n"
    )
    assert build_prompt("mistral_instruct", Q) == "[INST] <image>\nWhat is in the picture? [/INST]"
    assert build_prompt("chatml_direct", Q) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the "
        "picture?<|im_end|><|im_start|>assistant\n"
    )


def test_multi_turn_and_multi_image_prompts():
    assert build_prompt("vicuna_v1", "And now?", 1, [(Q, "A cat.")]).endswith(
        "USER: <image>\nWhat is in the picture? ASSISTANT: A cat.</s>USER: And now? ASSISTANT:"
    )
    assert build_prompt("gemma", "And now?", 1, [(Q, "A cat.")]).endswith(
        "<start_of_turn>model\nA cat.<end_of_turn>\n<eos><start_of_turn>user\nAnd now?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert build_prompt("mistral_instruct", "And now?", 1, [(Q, "A cat.")]) == (
        "[INST] <image>\nWhat is in the picture? [/INST] A cat. </s><s>[INST] And now? [/INST]"
    )
    assert "USER: Image 1:<image>\nImage 2:<image>\nCompare." in build_prompt("vicuna_v1", "Compare.", 2)
    with pytest.raises(MGMError, match="unknown conversation mode"):
        get_template("alpaca")


def test_template_detection_from_architecture_and_tokenizer(tiny_checkpoints):
    for llm, template, expected in [
        ("llama", None, "vicuna_v1"),
        ("llama", "llama_3", "llama_3"),
        ("llama", "chatml_direct", "chatml_direct"),
        ("gemma", None, "gemma"),
        ("mixtral", None, "mistral_instruct"),
    ]:
        _, tok, cfg, _, _ = build_tiny(llm, template=template)
        assert default_conv_mode(cfg.family, tok) == expected


def test_tokenizer_image_token_keeps_one_bos_and_one_placeholder():
    _, tok, _, _, _ = build_tiny("llama")
    prompt = build_prompt("vicuna_v1", Q)
    ids = tokenizer_image_token(prompt, tok)
    before, after = prompt.split("<image>")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[:k] == tok(before).input_ids and ids[k + 1 :] == tok(after).input_ids[1:]


# ---- loader round trips --------------------------------------------------------------------------
def in_memory_model(llm, hd=False, template=None) -> MGM:
    raw, tok, cfg, vision, model = build_tiny(llm, hd, seed=0, template=template)
    return MGM(cfg, vision, model, tok, default_conv_mode(cfg.family, tok))


def prompt_ids(model: MGM, question=Q, n_images=1):
    return tokenizer_image_token(build_prompt(model.conv_mode, question, n_images), model.tokenizer)


@pytest.mark.parametrize(
    "llm,hd,shards", [("llama", False, 2), ("gemma", False, 1), ("mixtral", False, 3), ("llama", True, 2)]
)
def test_loaded_checkpoint_reproduces_in_memory_logits(tiny_checkpoints, llm, hd, shards):
    ref = in_memory_model(llm, hd)
    loaded = load_model(tiny_checkpoints(llm, hd, shards=shards))
    px = ref.processor([random_image(seed=3)])
    feats_ref, feats = ref.encode_images(px), loaded.encode_images(px)
    assert torch.equal(feats_ref, feats)
    ids = [prompt_ids(ref)]
    assert torch.equal(ref.logits(ids, feats_ref), loaded.logits(ids, feats))


def test_towers_from_separate_folders(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama", shards=1)
    state = load_file(src / "model.safetensors")
    clip = {
        k.removeprefix("model.vision_tower.vision_tower."): v
        for k, v in state.items()
        if k.startswith("model.vision_tower.vision_tower.")
    }
    convnext = {
        k.replace("model.vision_tower_aux.vision_", "visual.trunk."): v
        for k, v in state.items()
        if k.startswith("model.vision_tower_aux.")
    }
    mgm_dir, clip_dir, cn_dir = tmp_path / "mgm", tmp_path / "clip", tmp_path / "convnext"
    shutil.copytree(src, mgm_dir)
    save_file({k: v for k, v in state.items() if not k.startswith("model.vision_tower")}, mgm_dir / "model.safetensors")
    clip_dir.mkdir()
    cn_dir.mkdir()
    save_file(clip, clip_dir / "model.safetensors")
    save_file(convnext, cn_dir / "open_clip_model.safetensors")

    with pytest.raises(CheckpointError, match="no CLIP weights"):
        load_model(mgm_dir)
    split = load_model(mgm_dir, clip_dir=clip_dir, convnext_dir=cn_dir)
    whole = load_model(src)
    px = whole.processor([random_image()])
    assert torch.equal(split.encode_images(px), whole.encode_images(px))
    # the HF CLIP folder layout written by transformers itself loads too
    CLIPVisionModel(MGMConfig.from_model_dir(src).clip_config).save_pretrained(tmp_path / "hfclip")
    load_model(mgm_dir, clip_dir=tmp_path / "hfclip", convnext_dir=cn_dir)


# ---- splicing and generation ---------------------------------------------------------------------
def test_gemma_scales_image_rows_like_inputs_embeds():
    model = in_memory_model("gemma")
    assert model.llm.config.hidden_act == "gelu"  # exact GELU, as MGM-2B trained under transformers 4.38
    feats = torch.randn(1, 576, model.config.hidden_size)
    embeds, _ = model.splice([prompt_ids(model)], feats)
    k = prompt_ids(model).index(IMAGE_TOKEN_INDEX)
    assert torch.equal(embeds[0, k : k + 576], feats[0])  # spliced raw; GemmaModel scales inside
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)

    hook = model.llm.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    model.logits([prompt_ids(model)], feats)
    hook.remove()
    scale = model.config.hidden_size**0.5
    assert torch.allclose(seen["h"][0, k : k + 576], feats[0] * torch.tensor(scale), rtol=1e-6)


def test_batched_left_padded_generation_equals_single(tiny_checkpoints):
    model = load_model(tiny_checkpoints("llama"))
    feats = model.image_features([random_image(seed=1)])
    feats2 = model.image_features([random_image(seed=2)])
    a, b = prompt_ids(model), prompt_ids(model, "Describe the picture in detail, please.")
    params = GenerationParams(max_new_tokens=12, temperature=0)
    singles = [model.generate([a], feats, params)[0], model.generate([b], feats2, params)[0]]
    batch = model.generate([a, b], torch.cat([feats, feats2]), params)
    assert batch == singles and len(singles[0]) > 0


def test_streaming_gives_the_same_text(tiny_checkpoints):
    import threading

    from transformers import TextIteratorStreamer

    model = load_model(tiny_checkpoints("gemma"))
    img = [random_image()]
    params = GenerationParams(max_new_tokens=10, temperature=0)
    text = model.chat(Q, img, params)
    streamer_box = {}

    def factory(tok):
        streamer_box["s"] = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        return streamer_box["s"]

    result = {}
    t = threading.Thread(target=lambda: result.setdefault("t", model.chat(Q, img, params, streamer_factory=factory)))
    t.start()
    while "s" not in streamer_box:
        pass
    pieces = list(streamer_box["s"])
    t.join()
    assert result["t"] == text and "".join(pieces).strip().startswith(text[:5])


def test_sampling_is_seeded_and_multi_image_works(tiny_checkpoints):
    model = load_model(tiny_checkpoints("mixtral"))
    imgs = [random_image(seed=4), random_image(seed=5)]
    params = GenerationParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert model.chat("Compare.", imgs, params) == model.chat("Compare.", imgs, params)


def greedy_by_full_forward(model: MGM, ids: list[int], feats, max_new_tokens: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no KV cache, no HF generate)."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model.logits([ids + out], feats)[0, -1].argmax())
        if token in model.stop_token_ids():
            break
        out.append(token)
    return out


def test_hd_generation_is_greedy_decoding_of_the_spliced_sequence(tiny_checkpoints):
    model = load_model(tiny_checkpoints("llama", hd=True))
    feats = model.image_features([random_image()])
    assert feats.shape[1] == model.config.tokens_per_image
    ids = model.generate([prompt_ids(model)], feats, GenerationParams(max_new_tokens=4, temperature=0))[0]
    assert ids and ids == greedy_by_full_forward(model, prompt_ids(model), feats, 4)
    with pytest.raises(PromptError, match="one image"):
        model.image_features([random_image(), random_image()])


def test_llama3_stops_on_eot(tiny_checkpoints):
    model = load_model(tiny_checkpoints("llama", template="llama_3"))
    assert model.conv_mode == "llama_3"
    eot = model.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in model.stop_token_ids() and model.tokenizer.eos_token_id in model.stop_token_ids()


# ---- bad input ---------------------------------------------------------------------------------
def test_prompt_image_count_mismatch(tiny_checkpoints):
    model = load_model(tiny_checkpoints("llama"))
    feats = model.image_features([random_image()])
    with pytest.raises(PromptError, match="2 <image> tags but only 1 images"):
        model.generate([prompt_ids(model, "<image> and <image>", 1)], feats)
    with pytest.raises(PromptError, match="only 0 <image> tags"):
        model.generate([prompt_ids(model, "no image", 0)], feats)
    with pytest.raises(PromptError, match="limit is 2048"):
        model.generate([prompt_ids(model, "word " * 3000)], feats)
    with pytest.raises(MGMError, match="max_new_tokens"):
        model.generate([prompt_ids(model)], feats, GenerationParams(max_new_tokens=0))


def test_bad_images(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(b"\x89PNG\r\n\x1a\nthis is not a png")
    path = tmp_path / "cut.png"
    random_image().save(path)
    data = path.read_bytes()
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="limit"):
        load_image(random_image(200, 100), max_pixels=10_000)


def test_bad_checkpoints(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama", shards=1)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    no_weights = copy("noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(no_weights)

    missing_key = copy("missingkey")
    state = load_file(missing_key / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.unexpected.weight"] = torch.zeros(1)
    save_file(state, missing_key / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing keys: model.layers.1.mlp.up_proj.weight.*unexpected keys: "
        r"model.unexpected.weight",
    ):
        load_model(missing_key)

    bad_arch = copy("badarch")
    cfg = json.loads((bad_arch / "config.json").read_text())
    cfg["architectures"] = ["LlavaLlamaForCausalLM"]
    (bad_arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not an MGM model"):
        load_model(bad_arch)
    cfg["architectures"], cfg["mm_projector_type"] = ["MGMLlamaForCausalLM"], "linear"
    (bad_arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mm_projector_type='linear' is not supported"):
        load_model(bad_arch)

    wrong_shape = copy("wrongshape")
    cfg = json.loads((wrong_shape / "config.json").read_text())
    del cfg["mm_vision_tower_aux_config"]
    cfg["mm_hidden_size_aux"] = 2880  # claims ConvNeXt-L
    (wrong_shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing keys|do not match"):
        load_model(wrong_shape)

    no_tok = copy("notok")
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_model(no_tok)

    sharded = tiny_checkpoints("llama", shards=2)
    lost_shard = tmp_path / "lostshard"
    shutil.copytree(sharded, lost_shard)
    next(lost_shard.glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(lost_shard)


def test_convnext_key_mapping_round_trip():
    from mgm_ref.loader import vision_to_official_key

    for key in [
        "model.vision_tower_aux.vision_stem.0.weight",
        "model.vision_tower_aux.vision_stem.1.bias",
        "model.vision_tower_aux.vision_stages.2.downsample.1.weight",
        "model.vision_tower_aux.vision_stages.2.blocks.17.gamma",
        "model.vision_tower_aux.vision_stages.0.blocks.1.mlp.fc2.bias",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
        "model.vlm_uni_val_projector.0.weight",
        "model.mm_projector.2.bias",
    ]:
        assert vision_to_official_key(official_to_vision_key(key)) == key


def test_cli_answers_once_and_reports_bad_input(tiny_checkpoints, tmp_path):
    img = tmp_path / "img.png"
    random_image().save(img)
    ckpt = str(tiny_checkpoints("llama"))
    cmd = [
        sys.executable,
        "-m",
        "mgm_ref.cli",
        "--model-path",
        ckpt,
        "--image-file",
        str(img),
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ]
    out = subprocess.run(cmd + ["--prompt", Q], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model = load_model(ckpt)
    assert out.stdout.strip() == model.chat(Q, [load_image(img)], GenerationParams(max_new_tokens=6))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    bad = subprocess.run(
        cmd[:6] + [str(tmp_path / "bad.png"), "--prompt", Q], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "cannot decode the image" in bad.stderr
    chat = subprocess.run(cmd, input=f"{Q}\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and "USER: ASSISTANT:" in chat.stdout
