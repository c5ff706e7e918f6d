"""The OpenAI front door without a server: conversation mapping, media policy, stop sequences, variants."""

from __future__ import annotations

import asyncio
import base64

import pytest

from client.openai_api.errors import APIError
from client.openai_api.mapping import StopMatcher, to_mgm
from client.openai_api.media import MediaPolicy, load_image
from client.openai_api.schema import ChatCompletionRequest
from client.openai_api.triton import _variants
from mgm_ref.conversation import build_prompt, get_template
from mgm_ref.errors import MGMError
from tests.helpers.images import png, random_image

PNG = png(random_image(32, 24))
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
NO_MEDIA_FETCHING = MediaPolicy()  # the server's default: data URLs only


def mapped(messages, policy=NO_MEDIA_FETCHING, **kw):
    req = ChatCompletionRequest(model="mgm", messages=messages, **kw)
    return asyncio.run(to_mgm(req, policy, max_images=8, default_max_tokens=16))


def status_of(messages, policy=NO_MEDIA_FETCHING, **kw) -> tuple[int, str]:
    with pytest.raises(APIError) as e:
        mapped(messages, policy, **kw)
    return e.value.status, e.value.message


def test_conversation_maps_to_history_images_and_system():
    m = mapped(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": DATA_URL}},
                    {"type": "text", "text": "What is it?"},
                ],
            },
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And the colours?"},
        ],
        max_completion_tokens=7,
        stop="x",
    )
    assert m.spec.prompt == "And the colours?" and m.spec.history == [("What is it?", "A cat.")]
    assert m.spec.images == [PNG] and m.system == "Be brief." and m.spec.max_tokens == 7 and m.stops == ["x"]
    assert m.tensors()["system_prompt"][0] == b"Be brief." and m.tensors()["stream"][0]


@pytest.mark.parametrize(
    "messages,kw,status,message",
    [
        ([{"role": "assistant", "content": "hi"}], {}, 400, "last message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}, 400, "alternate"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
            {},
            400,
            "system messages must come before",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]},
            ],
            {},
            400,
            "first user message",
        ),
        ([{"role": "user", "content": "a"}], {"n": 3}, 400, "n=1"),
        ([{"role": "user", "content": "a"}], {"max_tokens": 0}, 400, "at least 1"),
        ([{"role": "user", "content": "a"}], {"temperature": 3.0}, 400, "temperature"),
        ([{"role": "user", "content": "a"}], {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}] * 9}],
            {},
            400,
            "at most 8",
        ),
    ],
)
def test_bad_conversations_are_400(messages, kw, status, message):
    got, text = status_of(messages, **kw)
    assert got == status and message in text


def image(url, policy=NO_MEDIA_FETCHING):
    return asyncio.run(load_image(url, policy, "p"))


def test_media_policy(tmp_path):
    assert image(DATA_URL) == PNG
    for url, status, message in [
        ("https://example.com/cat.png", 400, "does not fetch"),
        ("file:///etc/passwd", 400, "allowed_local_media_path"),
        ("data:image/gif;base64,R0lGOD", 400, "unsupported image type"),
        ("data:image/png;base64,@@@@", 400, "base64"),
        ("data:image/png;base64," + base64.b64encode(b"hello world").decode(), 400, "not a PNG"),
        ("data:image/png;base64," + "A" * 2_000_000, 413, "limit"),
        ("ftp://x/y.png", 400, "data:image"),
    ]:
        with pytest.raises(APIError) as e:
            image(url, MediaPolicy(max_image_bytes=1024 * 1024))
        assert e.value.status == status and message in e.value.message, url
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    policy = MediaPolicy(allowed_local_path=allowed)
    assert image(f"file://{allowed}/cat.png", policy) == PNG
    for url in (f"file://{tmp_path}/secret.png", f"file://{allowed}/../secret.png"):
        with pytest.raises(APIError, match="must lie under"):
            image(url, policy)


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(["STOP", "\n\n"])
    out = [m.push(t) for t in ("Hel", "lo S", "TO", "P and more")]
    assert "".join(out) == "Hello " and m.stopped
    m = StopMatcher(["xyz"])
    assert m.push("abx") == "a" and m.push("yq") == "bx" and m.flush() == "yq" and not m.stopped


def test_system_prompt_replaces_the_templates_and_is_refused_without_one():
    prompt = build_prompt("vicuna_v1", "Hi", 0, system="Be brief.")
    conv = get_template("vicuna_v1")
    conv.system = "Be brief."
    conv.append("USER", "Hi")
    conv.append("ASSISTANT", None)
    assert prompt == conv.get_prompt() and "curious user" not in prompt
    with pytest.raises(MGMError, match="no system prompt"):
        build_prompt("gemma", "Hi", 0, system="Be brief.")


def test_variants_from_the_repository_index():
    ready = [
        {"name": p + m, "state": "READY"}
        for p in ("", "b_")
        for m in ("preprocessing", "vision_encoder", "tensorrt_llm", "mgm_bls", "ensemble")
    ]
    index = ready + [
        {"name": "c_mgm_bls", "state": "READY"},
        {"name": "c_vision_encoder", "state": "UNAVAILABLE", "reason": "load failed"},
    ]
    found = _variants(index, "mgm")
    assert sorted(found) == ["b", "c", "mgm"] and found["b"].bls_model == "b_mgm_bls"
    assert found["mgm"].ready and found["b"].ready and not found["c"].ready
    assert "c_vision_encoder is unavailable: load failed" in found["c"].reason


def test_named_variant_prefixes_models_and_keeps_the_others(tmp_path):
    from triton_models.variants import add_named_variant, variant_names

    def build(out):
        for name in ("preprocessing", "ensemble", "mgm_bls"):
            (out / name / "1").mkdir(parents=True)
            step = '  step [\n    {\n      model_name: "preprocessing"\n' if name == "ensemble" else ""
            (out / name / "config.pbtxt").write_text(
                f'name: "{name}"\ninput [\n  {{\n    name: "text_input"\n  }}\n]\n{step}'
            )
        return out

    repo = tmp_path / "repo"
    add_named_variant(build, repo, "mgm-7b")
    add_named_variant(build, repo, "mgm-hd")
    add_named_variant(build, repo, "mgm-7b")  # replaced, not duplicated
    assert sorted(p.name for p in repo.iterdir()) == sorted(
        f"{v}_{m}" for v in ("mgm-7b", "mgm-hd") for m in ("preprocessing", "ensemble", "mgm_bls")
    )
    text = (repo / "mgm-hd_ensemble" / "config.pbtxt").read_text()
    assert 'name: "mgm-hd_ensemble"' in text and 'model_name: "mgm-hd_preprocessing"' in text
    assert '    name: "text_input"' in text  # tensor names stay
    assert variant_names(repo) == ["mgm-7b", "mgm-hd"]
    with pytest.raises(MGMError):
        add_named_variant(build, repo, "bad_name")


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_delta_is_the_chunk_json_encoded_whole(include_usage):
    from client.openai_api import schema
    from client.openai_api.app import _ContentEvents, _sse

    for model in ['mo"del\\', "a\x00b", "mgm"]:
        events = _ContentEvents("chatcmpl-x", model, 12, include_usage)
        for text in ["hi", 'a"b\\c\n\x00é😀', "", "\u2028"]:
            whole = _sse(schema.chunk("chatcmpl-x", model, 12, {"content": text}, include_usage=include_usage))
            assert events(text) == whole
