"""Request limits and small errors of the serving side, in process against tests/triton_stub.py: text
bounded by its bytes before tokenising, `max_tokens` checked before vision by its own name, error texts
without Python reprs, answers cut by max_tokens without a replacement character, bad tensors failing
only their own request, and failures/cancellations of the decoupled models counted in metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time

import numpy as np
import pytest

from mgm_ref.constants import MAX_BYTES_PER_TOKEN, text_bytes_limit
from mgm_ref.errors import PromptError
from mgm_ref.loader import load_tokenizer
from tests import triton_stub as tb
from tests.helpers.images import png, random_image
from tests.test_triton_models import llm_request, start, text, values
from triton_models.lib.detokenize import IncrementalDetokenizer
from triton_models.lib.preprocess import Preprocessor

MAX_INPUT_LEN = 2048
# what an error text must never show: object reprs, numpy scalar reprs, internal tensor names
REPR = re.compile(r"object at 0x|NoneType|<class |np\.\w+\(|array\(|Traceback")


@pytest.fixture(scope="module")
def pre(llama_dir):
    return Preprocessor(llama_dir, max_input_len=MAX_INPUT_LEN)


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return load_tokenizer(llama_dir)


# ---- text bounded in bytes, before tokenising ------------------------------------------------------
def over_limit(n_bytes: int) -> dict[str, dict]:
    """One text field over `n_bytes` at a time (the others small); keyword arguments of Preprocessor()."""
    big = "word " * (n_bytes // 5 + 1)
    return {
        "query": {"query": big},
        "history": {"query": "And now?", "history": [("first", "answer"), (big, "ok")]},
        "system": {"query": "Hi.", "system": big},
    }


@pytest.mark.parametrize("field", ["query", "history", "system"])
def test_text_over_the_byte_bound_is_refused_by_its_bytes(pre, field):
    limit = text_bytes_limit(MAX_INPUT_LEN)
    with pytest.raises(PromptError, match=rf"{limit} bytes") as e:
        pre(images=[], **over_limit(limit)[field])
    assert "max_input_len 2048" in str(e.value)


def test_16_mb_of_text_is_refused_in_milliseconds(pre):
    kwargs = over_limit(16 << 20)
    for field in ("query", "history", "system"):
        start_s = time.process_time()
        with pytest.raises(PromptError, match="bytes"):
            pre(images=[], **kwargs[field])
        assert time.process_time() - start_s < 0.5, field  # CPU time: tokenising it took 29 s


def test_text_under_the_byte_bound_still_gets_the_exact_token_check(pre):
    # below the byte bound but over the context: the token count refuses it, as before
    with pytest.raises(PromptError, match="tokens"):
        pre("word " * 3000, [])
    assert len(pre("word " * 100, []).input_ids) < MAX_INPUT_LEN


@pytest.mark.parametrize("llm", ["llama", "gemma"])
def test_no_token_stands_for_more_bytes_than_the_bound(tiny_checkpoints, llm):
    """The bound's premise, on the tokenizers we can load here: a token's string is never shorter in
    UTF-8 than the text it decodes to (byte-level BPE: one char per byte; sentencepiece: a 3-byte
    marker per space), so its length bounds the bytes of text one token can consume."""
    tok = load_tokenizer(tiny_checkpoints(llm))
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    longest = max(len(p.encode()) for p in pieces)
    assert 1 < longest <= MAX_BYTES_PER_TOKEN
    for i in range(len(tok)):
        assert len(tok.decode([i]).encode()) <= max(len(pieces[i].encode()), 1) + 1  # +1: a prefix space


# ---- max_tokens, by its own name, before vision ------------------------------------------------------
def preprocessing_request(**inputs):
    base = {"QUERY": text("What is it?"), "REQUEST_OUTPUT_LEN": np.array([[8]], np.int32)}
    base.update(inputs)
    return tb.Request({k: v for k, v in base.items() if v is not None})


def test_max_tokens_below_one_is_refused_by_preprocessing_by_its_name(stub, llama_dir):
    model = start("preprocessing", tb.model_config("preprocessing", **values(llama_dir)))
    zero = preprocessing_request(REQUEST_OUTPUT_LEN=np.array([[0]], np.int32))
    negative = preprocessing_request(REQUEST_OUTPUT_LEN=np.array([[-3]], np.int32))
    missing = preprocessing_request(REQUEST_OUTPUT_LEN=None)
    good = preprocessing_request()
    out = model.execute([zero, negative, missing, good])
    assert out[0].error().message() == "max_tokens must be at least 1, got 0"
    assert out[1].error().message() == "max_tokens must be at least 1, got -3"
    assert "max_tokens" in out[2].error().message()
    for o in out[:3]:
        assert "REQUEST_OUTPUT_LEN" not in o.error().message() and not REPR.search(o.error().message())
    assert not out[3].has_error()


def test_bls_refuses_max_tokens_0_before_vision_runs(stub, llama_dir):
    """The BLS sends max_tokens to preprocessing, whose error ends the request before any vision call."""
    pre_model = start("preprocessing", tb.model_config("preprocessing", **values(llama_dir)))

    def preprocessing(inputs):
        return pre_model.execute([tb.Request(inputs)])[0]

    tb.downstream.update(preprocessing=preprocessing)  # no vision_encoder: calling it would fail the test
    model = start("mgm_bls", tb.model_config("mgm_bls", **values(llama_dir)))
    req = tb.Request({"text_input": text("Hi?"), "max_tokens": np.array([[0]], np.int32)})
    try:
        asyncio.run(model.execute([req]))
    finally:
        model.finalize()
    assert [m for m, _ in tb.bls_calls] == ["preprocessing"]
    assert req.sender.sent[-1][0].error().message() == "max_tokens must be at least 1, got 0"


# ---- error texts -------------------------------------------------------------------------------------
def test_error_texts_name_the_input_and_carry_no_python_reprs(stub, llama_dir):
    pre_model = start("preprocessing", tb.model_config("preprocessing", **values(llama_dir)))
    post = start("postprocessing", tb.model_config("postprocessing", **values(llama_dir)))
    out = pre_model.execute(
        [
            preprocessing_request(QUERY=None),
            preprocessing_request(IMAGE=np.zeros((1, 4), np.uint8), IMAGE_SIZES=np.array([[9]], np.int32)),
            preprocessing_request(HISTORY=text("{not json")),
        ]
    )
    out += post.execute(
        [
            tb.Request({"TOKENS_BATCH": np.zeros((1, 1, 3), np.int32)}),
            tb.Request({"TOKENS_BATCH": np.zeros((1, 1, 3), np.int32), "SEQUENCE_LENGTH": np.zeros((1, 0), np.int32)}),
        ]
    )
    messages = [o.error().message() for o in out]
    assert all(not REPR.search(m) for m in messages), messages
    assert "QUERY" in messages[0] or "prompt" in messages[0]
    assert "SEQUENCE_LENGTH" in messages[3] and "SEQUENCE_LENGTH" in messages[4]


# ---- an answer cut by max_tokens -----------------------------------------------------------------------
def cut_mid_character(tokenizer) -> list[int]:
    ids = tokenizer.encode(" a smile 😀", add_special_tokens=False)
    for n in range(len(ids), 0, -1):
        if tokenizer.decode(ids[:n]).endswith("\ufffd"):
            return ids[:n]
    raise AssertionError("the emoji is one token in this vocabulary")


def test_an_answer_cut_inside_a_character_does_not_end_in_a_replacement_character(tokenizer):
    ids = cut_mid_character(tokenizer)
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.push([i]) for i in ids) + detok.finish()
    assert "\ufffd" not in streamed and streamed.rstrip() == " a smile"
    # a replacement character the model really wrote (invalid bytes mid-answer) stays
    assert "\ufffd" in tokenizer.decode([*ids, *tokenizer.encode(" ok", add_special_tokens=False)])


def test_postprocessing_answer_cut_inside_a_character_has_no_replacement_character(stub, llama_dir, tokenizer):
    ids = cut_mid_character(tokenizer)
    post = start("postprocessing", tb.model_config("postprocessing", **values(llama_dir)))
    (out,) = post.execute(
        [tb.Request({"TOKENS_BATCH": np.array([[ids]], np.int32), "SEQUENCE_LENGTH": np.array([[len(ids)]], np.int32)})]
    )
    assert out.output("OUTPUT")[0, 0].decode() == "a smile"


# ---- one bad request of a dynamic batch fails alone ----------------------------------------------------
def test_postprocessing_bad_tensors_fail_only_their_request(stub, llama_dir, tokenizer):
    post = start("postprocessing", tb.model_config("postprocessing", **values(llama_dir)))
    ids = tokenizer.encode(" Fine.", add_special_tokens=False)

    def req(tokens, length):
        return tb.Request(
            {"TOKENS_BATCH": np.array([[tokens]], np.int32), "SEQUENCE_LENGTH": np.array([[length]], np.int32)}
        )

    out = post.execute([req(ids, len(ids)), req([-5, 3], 2), req(ids, 99), req(ids, len(ids))])
    assert [o.has_error() for o in out] == [False, True, True, False]
    assert out[0].output("OUTPUT")[0, 0].decode() == "Fine." == out[3].output("OUTPUT")[0, 0].decode()
    assert out[1].error().message() == "token id -5 is negative"
    assert "SEQUENCE_LENGTH" in out[2].error().message()


# ---- failures and cancellations of the decoupled models, as metrics -------------------------------------
def counter(name: str, **labels) -> float:
    family = tb.metric_families[name]
    assert family.kind == tb.MetricFamily.COUNTER
    return family.value(labels)


def test_llm_model_counts_failures_and_cancellations(stub, llama_dir):
    model = start("tensorrt_llm_cpu", tb.model_config("tensorrt_llm_cpu", **values(llama_dir)))
    bad = llm_request([5, 6], 0, streaming=True)
    running = llm_request([5, 6, 7], 4000, streaming=True)

    async def run():
        await model.execute([bad])
        task = asyncio.ensure_future(model.execute([running]))
        while len(running.sender.sent) < 3:
            await asyncio.sleep(0.01)
        running.cancelled = True
        await asyncio.wait_for(task, 30)

    try:  # read before finalize, which releases the families
        asyncio.run(run())
        assert counter("mgm_request_failures_total", model="tensorrt_llm", reason="invalid_input") == 1
        assert counter("mgm_request_cancellations_total", model="tensorrt_llm") == 1
    finally:
        model.finalize()


def test_bls_counts_failures_by_reason_and_cancellations(stub, llama_dir):
    def preprocessing(inputs):
        if inputs["QUERY"][0, 0] == b"crash":
            raise KeyError("boom")  # an internal failure of the stage
        return tb.InferenceResponse([], error=tb.TritonError("the prompt is empty"))

    tb.downstream.update(preprocessing=preprocessing)
    model = start("mgm_bls", tb.model_config("mgm_bls", **values(llama_dir)))
    reqs = [tb.Request({"text_input": text(q), "max_tokens": np.array([[4]], np.int32)}) for q in (" ", "crash")]
    gone = tb.Request({"text_input": text("Hi"), "max_tokens": np.array([[4]], np.int32)})
    gone.cancelled = True
    try:  # read before finalize, which releases the families
        asyncio.run(model.execute([*reqs, gone]))
        assert counter("mgm_request_failures_total", model="mgm_bls", reason="invalid_input") == 1
        assert counter("mgm_request_failures_total", model="mgm_bls", reason="internal") == 1
        assert counter("mgm_request_cancellations_total", model="mgm_bls") == 1
        assert json.dumps(tb.metric_families["mgm_request_failures_total"].description)
    finally:
        model.finalize()
    assert reqs[0].sender.sent[-1][0].error().message() == "the prompt is empty"
    internal = reqs[1].sender.sent[-1][0].error().message()
    assert "internal error" in internal and not REPR.search(internal) and "boom" not in internal


def test_vision_encoder_bad_tensors_fail_only_their_request(stub, llama_dir, monkeypatch):
    import triton_models.lib.vision_runner as vr
    from mgm_ref.config import MGMConfig

    cfg = MGMConfig.from_model_dir(llama_dir)

    def fake_runner(images, images_aux):
        assert len(images) == len(images_aux), "a mismatched request reached the batch's run"
        return {"image_features": np.ones((len(images), 3, cfg.hidden_size), np.float32)}

    monkeypatch.setattr(
        vr,
        "load_vision_artifact",
        lambda d, t: ({"max_batch_size": 8, "tokens_per_image": 3, "hidden_size": cfg.hidden_size}, fake_runner),
    )
    model = start("vision_encoder", tb.model_config("vision_encoder", **values(llama_dir)))
    good, other = png(random_image(64, 48, seed=1)), png(random_image(40, 60, seed=2))

    def req(*blobs: bytes, sizes=None):
        if not blobs:
            return tb.Request({})
        data = np.frombuffer(b"".join(blobs), np.uint8)[None]
        sizes = [len(b) for b in blobs] if sizes is None else sizes
        return tb.Request({"IMAGE_BYTES": data, "IMAGE_BYTE_SIZES": np.array([sizes], np.int32)})

    out = model.execute([req(good), req(good, other, sizes=[5, 5]), req(b"not an image"), req(), req(good, other)])
    assert [o.has_error() for o in out] == [False, True, True, False, False]
    assert "do not add up" in out[1].error().message()
    assert "cannot decode" in out[2].error().message()
    assert [out[k].output("OUT_PROMPT_VOCAB_SIZE").item() for k in (0, 3, 4)] == [3, 0, 6]
