"""Every model.py of the repository, run in-process against tests/triton_stub.py (no server)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from mgm_ref.config import MGMConfig
from mgm_ref.loader import load_tokenizer
from tests import triton_stub as tb
from tests.helpers.images import png, random_image
from triton_models.lib.triton_io import ModelConfigError
from triton_models.repo_builder import extra_ids_values


def values(model_dir, **extra):
    config = MGMConfig.from_model_dir(model_dir)
    out = dict(
        triton_max_batch_size=8,
        max_queue_delay_microseconds=1000,
        max_queue_size=32,
        model_dir=model_dir,
        hidden_size=config.hidden_size,
        max_input_len=2048,
        max_seq_len=3072,
        max_images_per_request=4,
        preprocessing_instances=1,
        postprocessing_instances=1,
        vision_dir="/nonexistent",
        vision_threads=1,
        vision_instances=1,
        prompt_table_type="TYPE_FP32",
        max_active_requests=4,
        llm_threads=1,
        vocab_offset=config.vocab_size,
        image_cache_mb=64,
        **extra_ids_values(True),
        kv_cache_reuse="true",
        kv_cache_mb=64,
    )
    out.update(extra)
    return out


def start(name, config):
    model = tb.load_model(name).TritonPythonModel()
    model.initialize(tb.args_for(config))
    return model


def text(value: str) -> np.ndarray:
    return np.array([[value.encode()]], dtype=np.object_)


# ---- load-time config checks ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,edit,message",
    [
        (
            "preprocessing",
            lambda c: c.update(model_transaction_policy={"decoupled": True}),
            "must not use the decoupled",
        ),
        ("postprocessing", lambda c: c["input"].pop(), "no input 'CONV_MODE'"),
        ("tensorrt_llm_cpu", lambda c: c.pop("model_transaction_policy"), "must use the decoupled"),
        ("mgm_bls", lambda c: c["output"][0].update(data_type="TYPE_INT32"), "text_output' must be TYPE_STRING"),
        ("preprocessing", lambda c: c["output"][2].update(dims=["-1", "3", "224", "224"]), "must have dims"),
    ],
)
def test_a_wrong_config_fails_at_load_time(stub, llama_dir, name, edit, message):
    config = tb.model_config(name, **values(llama_dir))
    edit(config)
    with pytest.raises(ModelConfigError, match=message):
        start(name, config)


# ---- preprocessing --------------------------------------------------------------------------------
def test_preprocessing_model_answers_each_request_alone(stub, llama_dir):
    model = start("preprocessing", tb.model_config("preprocessing", **values(llama_dir)))
    image = np.frombuffer(png(random_image(50, 40, seed=4)), np.uint8)[None]
    good = tb.Request(
        {
            "QUERY": text("What is it?"),
            "IMAGE": image,
            "IMAGE_SIZES": np.array([[image.size]], np.int32),
            "REQUEST_OUTPUT_LEN": np.array([[8]], np.int32),
        }
    )
    bad = tb.Request({"QUERY": text("   "), "REQUEST_OUTPUT_LEN": np.array([[8]], np.int32)})
    long = tb.Request({"QUERY": text("Hi."), "REQUEST_OUTPUT_LEN": np.array([[5000]], np.int32)})
    out = model.execute([good, bad, long])
    assert not out[0].has_error() and out[1].error().message() == "the prompt is empty"
    assert "max_seq_len" in out[2].error().message()
    ids = out[0].output("INPUT_ID")
    assert ids.dtype == np.int32 and out[0].output("REQUEST_INPUT_LEN").tolist() == [[ids.shape[1]]]
    # the image leaves still encoded: its bytes and byte count, nothing decoded
    assert out[0].output("IMAGE_BYTES").tobytes() == image.tobytes()
    assert out[0].output("IMAGE_BYTE_SIZES").tolist() == [[image.size]]
    extra = out[0].output("PROMPT_TABLE_EXTRA_IDS")
    assert extra.dtype == np.uint64 and extra.shape == ids.shape
    assert ((extra != 0) == (ids >= MGMConfig.from_model_dir(llama_dir).vocab_size)).all()
    assert out[0].output("STOP_WORDS_IDS").shape[:2] == (1, 2)


# ---- postprocessing -------------------------------------------------------------------------------
def test_postprocessing_trims_with_each_requests_template(stub, llama_dir):
    tokenizer = load_tokenizer(llama_dir)
    model = start("postprocessing", tb.model_config("postprocessing", **values(llama_dir)))
    ids = tokenizer.encode(" It is red.<|im_end|>tail</s>more", add_special_tokens=False)
    tokens = np.array([[[*ids, 0, 0]]], np.int32)
    length = np.array([[len(ids)]], np.int32)

    def req(conv_mode=None):
        inputs = {"TOKENS_BATCH": tokens, "SEQUENCE_LENGTH": length}
        if conv_mode:
            inputs["CONV_MODE"] = text(conv_mode)
        return tb.Request(inputs)

    out = model.execute([req(), req("chatml_direct"), req("no_such_template")])
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert out[0].output("OUTPUT")[0, 0].decode() == decoded.split("</s>")[0].strip()  # default: vicuna_v1
    assert out[1].output("OUTPUT")[0, 0].decode() == "It is red."
    assert "unknown conversation mode" in out[2].error().message()


def test_ensemble_config_takes_every_postprocessing_input_from_tensorrt_llm(llama_dir):
    # Triton refuses to load an ensemble whose step after a decoupled model also takes another input
    config = tb.model_config("ensemble", **values(llama_dir))
    wires = {
        v: s["model_name"] for s in config["ensemble_scheduling"]["step"] for v in s.get("output_map", {}).values()
    }
    post = next(s for s in config["ensemble_scheduling"]["step"] if s["model_name"] == "postprocessing")
    assert {wires.get(v) for v in post["input_map"].values()} == {"tensorrt_llm"}
    used = {v for s in config["ensemble_scheduling"]["step"] for v in s["input_map"].values()}
    assert {i["name"] for i in config["input"]} <= used  # Triton also refuses an unused ensemble input


@pytest.mark.parametrize("llm_takes_extra_ids", [True, False])
def test_ensemble_steps_use_only_tensors_their_models_declare(llama_dir, llm_takes_extra_ids):
    vals = values(llama_dir, **extra_ids_values(llm_takes_extra_ids))
    config = tb.model_config("ensemble", **vals)
    templates = {"tensorrt_llm": "tensorrt_llm_cpu"}
    for step in config["ensemble_scheduling"]["step"]:
        model = tb.model_config(templates.get(step["model_name"], step["model_name"]), **vals)
        assert set(step["input_map"]) <= {i["name"] for i in model["input"]}, step["model_name"]
        assert set(step["output_map"]) <= {o["name"] for o in model["output"]}, step["model_name"]
    llm = next(s for s in config["ensemble_scheduling"]["step"] if s["model_name"] == "tensorrt_llm")
    assert ("prompt_table_extra_ids" in llm["input_map"]) == llm_takes_extra_ids


# ---- vision encoder ---------------------------------------------------------------------------------
def fake_artifact(monkeypatch, cfg, tokens=3, max_batch_size=4):
    """The vision artifact replaced by a function of the pixels (each row: the image's mean LR pixel
    and its mean HR pixel); returns the list of batch sizes it ran."""
    import triton_models.lib.vision_runner as vr

    runs = []

    def run(images, images_aux):
        runs.append(images.shape[0])
        n = images.shape[0]
        lr = images.reshape(n, -1).mean(1, keepdim=True)
        hr = images_aux.reshape(n, -1).mean(1, keepdim=True)
        row = torch.cat([lr, hr], 1).repeat(1, cfg.hidden_size // 2)
        return {"image_features": row[:, None, :].repeat(1, tokens, 1)}

    info = {"max_batch_size": max_batch_size, "tokens_per_image": tokens, "hidden_size": cfg.hidden_size}
    monkeypatch.setattr(vr, "load_vision_artifact", lambda d, t: (info, run))
    return runs


def image_request(*images: bytes):
    blob = np.frombuffer(b"".join(images), np.uint8)
    return tb.Request({"IMAGE_BYTES": blob[None], "IMAGE_BYTE_SIZES": np.array([[len(b) for b in images]], np.int32)})


def test_vision_encoder_decodes_misses_of_a_batch_in_one_run(stub, llama_dir, monkeypatch):
    from mgm_ref.preprocess import ImageProcessor, load_image

    cfg = MGMConfig.from_model_dir(llama_dir)
    runs = fake_artifact(monkeypatch, cfg)
    model = start("vision_encoder", tb.model_config("vision_encoder", **values(llama_dir)))
    a, b = png(random_image(60, 40, seed=1)), png(random_image(30, 50, seed=2))
    out = model.execute([image_request(a, b), image_request(), image_request(b)])
    assert runs == [2]  # the two distinct images of the batch in one run; b once
    tables = [o.output("OUT_PROMPT_EMBEDDING_TABLE") for o in out]
    assert [t.shape for t in tables] == [(1, 6, cfg.hidden_size), (1, 0, cfg.hidden_size), (1, 3, cfg.hidden_size)]
    assert [o.output("OUT_PROMPT_VOCAB_SIZE").tolist() for o in out] == [[[6]], [[0]], [[3]]]
    # the pixels are mgm_ref's: the fake artifact's rows are their means
    ref = ImageProcessor(cfg)([load_image(a), load_image(b)])
    want = torch.stack([ref.images.reshape(2, -1).mean(1), ref.images_aux.reshape(2, -1).mean(1)], 1)
    got = torch.from_numpy(tables[0][0, ::3, :2])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.array_equal(tables[2][0], tables[0][0, 3:])
    # a second batch with the same images runs nothing
    out = model.execute([image_request(b, a)])
    assert runs == [2] and np.array_equal(out[0].output("OUT_PROMPT_EMBEDDING_TABLE")[0, :3], tables[0][0, 3:])
    labels = dict(model="vision_encoder", version="")
    assert tb.metric_value("mgm_image_cache_hits_total", **labels) == 2
    assert tb.metric_value("mgm_image_cache_misses_total", **labels) == 2
    assert tb.metric_value("mgm_image_cache_entries", **labels) == 2
    assert tb.metric_value("mgm_image_cache_bytes", **labels) == 2 * 3 * cfg.hidden_size * 4
    assert tb.metric_value("mgm_image_cache_budget_bytes", **labels) == 64 << 20


def test_vision_encoder_fails_only_the_request_with_a_bad_image(stub, llama_dir, monkeypatch):
    cfg = MGMConfig.from_model_dir(llama_dir)
    runs = fake_artifact(monkeypatch, cfg)
    model = start("vision_encoder", tb.model_config("vision_encoder", **values(llama_dir)))
    good = png(random_image(60, 40, seed=1))
    broken = good[: len(good) // 2]  # a valid header, truncated pixels: found only when decoding
    bad_sizes = tb.Request({"IMAGE_BYTES": np.zeros((1, 4), np.uint8), "IMAGE_BYTE_SIZES": np.array([[9]], np.int32)})
    out = model.execute([image_request(good), image_request(good, broken), bad_sizes])
    assert not out[0].has_error() and runs == [1]
    assert "image 2 of 2" in out[1].error().message() and "cannot decode" in out[1].error().message()
    assert "do not add up" in out[2].error().message()
    assert model.encoder.cache.stats().entries == 1  # the broken image is not cached


# ---- tensorrt_llm (CPU) ---------------------------------------------------------------------------
def llm_request(ids, max_tokens, streaming, **extra):
    inputs = {
        "input_ids": np.array([ids], np.int32),
        "input_lengths": np.array([[len(ids)]], np.int32),
        "request_output_len": np.array([[max_tokens]], np.int32),
        "streaming": np.array([[streaming]]),
    }
    inputs.update(extra)
    return tb.Request(inputs, request_id=f"r{len(ids)}")


def test_llm_model_streams_solo_greedy_tokens_from_one_thread(stub, llama_dir):
    import threading

    from mgm_ref.loader import load_llm
    from triton_models.lib.engine import GenerationRequest, LLMEngine

    llm, _, _ = load_llm(llama_dir, dtype=torch.float32)
    with LLMEngine(llm) as engine:
        solo = [engine.generate(GenerationRequest(list(range(5, 5 + n)), max_new_tokens=7)) for n in (4, 9, 13)]
    model = start("tensorrt_llm_cpu", tb.model_config("tensorrt_llm_cpu", **values(llama_dir)))
    senders = set()
    for cls in (tb.ResponseSender,):
        original = cls.send

        def send(self, response=None, flags=0, _original=original):
            senders.add(threading.get_ident())
            _original(self, response, flags)

        cls.send = send
    try:
        reqs = [llm_request(list(range(5, 5 + n)), 7, streaming=s) for n, s in ((4, True), (9, False), (13, True))]
        bad = llm_request([5, 6], 0, streaming=True)
        asyncio.run(model.execute(reqs + [bad]))
    finally:
        tb.ResponseSender.send = original
        model.finalize()
    assert len(senders) == 1  # one owner sends every response
    streamed = [
        [int(r.output("output_ids").reshape(-1)[0]) for r in reqs[0].sender.responses()],
        reqs[1].sender.responses()[0].output("output_ids").reshape(-1).tolist(),
        [int(r.output("output_ids").reshape(-1)[0]) for r in reqs[2].sender.responses()],
    ]
    assert streamed == solo
    assert all(r.sender.finished for r in reqs + [bad])
    assert "max_new_tokens" in bad.sender.sent[-1][0].error().message()
    assert not model.engine.alive


def test_llm_model_cancels_when_the_client_leaves(stub, llama_dir):
    model = start("tensorrt_llm_cpu", tb.model_config("tensorrt_llm_cpu", **values(llama_dir)))
    req = llm_request([5, 6, 7], 4000, streaming=True)

    async def run():
        task = asyncio.ensure_future(model.execute([req]))
        while len(req.sender.sent) < 3:
            await asyncio.sleep(0.01)
        req.cancelled = True
        await asyncio.wait_for(task, 30)

    try:
        asyncio.run(run())
        assert req.sender.finished and len(req.sender.sent) < 1000
        assert model.engine.stats["cancelled"] == 1
    finally:
        model.finalize()


def test_llm_model_stop_request_ends_the_generation_with_that_id(stub, llama_dir):
    model = start("tensorrt_llm_cpu", tb.model_config("tensorrt_llm_cpu", **values(llama_dir)))
    running = llm_request([5, 6, 7], 4000, streaming=True)
    running._id = "gen-1"
    stop = llm_request([0], 1, streaming=False, stop=np.array([[True]]))
    stop._id = "gen-1"

    async def run():
        task = asyncio.ensure_future(model.execute([running]))
        while len(running.sender.sent) < 3:
            await asyncio.sleep(0.01)
        await model.execute([stop])
        await asyncio.wait_for(task, 30)

    try:
        asyncio.run(run())
        assert stop.sender.sent == [(None, tb.FINAL)]
        assert running.sender.finished and len(running.sender.sent) < 1000
        assert model.engine.stats["cancelled"] == 1 and not model.running
    finally:
        model.finalize()


# ---- mgm_bls ----------------------------------------------------------------------------------------
def test_bls_chains_the_models_and_streams_the_answer(stub, llama_dir):
    tokenizer = load_tokenizer(llama_dir)
    answer_ids = tokenizer.encode("   Blue sky.<|im_end|> then garbage", add_special_tokens=False)
    reads = []

    def preprocessing(inputs):
        assert inputs["QUERY"][0, 0] == b"Why?" and inputs["CONV_MODE"][0, 0] == b"chatml_direct"
        return tb.InferenceResponse(
            [
                tb.Tensor(n, np.zeros((1, 2), np.int32))
                for n in ("INPUT_ID", "REQUEST_INPUT_LEN", "END_ID", "STOP_WORDS_IDS")
            ]
            + [
                tb.Tensor("IMAGE_BYTES", np.zeros((1, 0), np.uint8)),
                tb.Tensor("IMAGE_BYTE_SIZES", np.zeros((1, 0), np.int32)),
                tb.Tensor("PROMPT_TABLE_EXTRA_IDS", np.zeros((1, 2), np.uint64)),
            ]
        )

    def vision(inputs):
        return tb.InferenceResponse(
            [
                tb.Tensor("OUT_PROMPT_EMBEDDING_TABLE", np.zeros((1, 0, 4), np.float32)),
                tb.Tensor("OUT_PROMPT_VOCAB_SIZE", np.zeros((1, 1), np.int32)),
            ]
        )

    stopped, read_to_end = set(), []

    def llm(inputs):
        if "stop" in inputs:
            stopped.add(inputs["request_id"])
            yield tb.InferenceResponse([])
            return
        assert inputs["streaming"].item() and inputs["request_output_len"].item() == 20
        for i in answer_ids:
            if inputs["request_id"] in stopped:  # as the engine: a stopped generation ends at its next step
                break
            reads.append(i)
            yield tb.InferenceResponse([tb.Tensor("output_ids", np.array([[[i]]], np.int32))])
        yield tb.InferenceResponse([])
        read_to_end.append(inputs["request_id"])  # reached only when asked for past the final response

    def llm_call(inputs):
        if "stop" in inputs:  # a stop request is answered at once, as by the real model
            return list(llm(inputs))
        return llm(inputs)

    tb.downstream.update(preprocessing=preprocessing, vision_encoder=vision, tensorrt_llm=llm_call)
    model = start("mgm_bls", tb.model_config("mgm_bls", **values(llama_dir)))
    try:
        reqs = [
            tb.Request(
                {
                    "text_input": text("Why?"),
                    "max_tokens": np.array([[20]], np.int32),
                    "conv_mode": text("chatml_direct"),
                    "stream": np.array([[stream]]),
                }
            )
            for stream in (True, False)
        ]
        asyncio.run(model.execute(reqs))
        deadline = time.monotonic() + 10
        while len(read_to_end) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        model.finalize()
    from collections import Counter

    assert Counter(m for m, _ in tb.bls_calls) == {"preprocessing": 2, "vision_encoder": 2, "tensorrt_llm": 4}
    # the generation was stopped at the stop string: a `stop` request with the generation's id
    generations = [i["request_id"] for m, i in tb.bls_calls if m == "tensorrt_llm" and "stop" not in i]
    stops = [i["request_id"] for m, i in tb.bls_calls if m == "tensorrt_llm" and "stop" in i]
    assert sorted(stops) == sorted(generations) and len(set(stops)) == 2 and all(stops)
    # the image keys go on to tensorrt_llm (this repository's tensorrt_llm declares the input)
    assert all(
        i["prompt_table_extra_ids"].dtype == np.uint64
        for m, i in tb.bls_calls
        if m == "tensorrt_llm" and "stop" not in i
    )
    streamed = [r.output("text_output")[0, 0].decode() for r in reqs[0].sender.responses()]
    assert "".join(streamed).strip() == "Blue sky." and not streamed[0][0].isspace() and len(streamed) > 2
    whole = reqs[1].sender.responses()
    assert len(whole) == 1 and whole[0].output("text_output")[0, 0].decode() == "Blue sky."
    assert all(r.sender.finished for r in reqs)
    assert len(reads) < 2 * len(answer_ids)  # reading stopped at the stop string both times
    # and each stopped stream was still read to its end: the python backend frees it only then
    assert sorted(read_to_end) == sorted(generations)
    assert model.waiters._shutdown


def test_bls_answer_survives_a_model_without_the_stop_input(stub, llama_dir):
    tokenizer = load_tokenizer(llama_dir)
    ids = tokenizer.encode(" Red.<|im_end|> more text", add_special_tokens=False)

    def llm(inputs):
        if "stop" in inputs:
            raise RuntimeError("unexpected inference input 'stop'")  # as a backend that lacks it
        return iter([tb.InferenceResponse([tb.Tensor("output_ids", np.array([[[i]]], np.int32))]) for i in ids])

    empty = {
        "IMAGE_BYTES": np.zeros((1, 0), np.uint8),
        "IMAGE_BYTE_SIZES": np.zeros((1, 0), np.int32),
        "PROMPT_TABLE_EXTRA_IDS": np.zeros((1, 2), np.uint64),
    }
    tb.downstream.update(
        preprocessing=lambda inputs: tb.InferenceResponse(
            [
                tb.Tensor(n, np.zeros((1, 2), np.int32))
                for n in ("INPUT_ID", "REQUEST_INPUT_LEN", "END_ID", "STOP_WORDS_IDS")
            ]
            + [tb.Tensor(n, v) for n, v in empty.items()]
        ),
        vision_encoder=lambda inputs: tb.InferenceResponse(
            [
                tb.Tensor("OUT_PROMPT_EMBEDDING_TABLE", np.zeros((1, 0, 4), np.float32)),
                tb.Tensor("OUT_PROMPT_VOCAB_SIZE", np.zeros((1, 1), np.int32)),
            ]
        ),
        tensorrt_llm=llm,
    )
    # a tensorrt_llm without prompt_table_extra_ids: the BLS must not send it
    model = start("mgm_bls", tb.model_config("mgm_bls", **values(llama_dir, **extra_ids_values(False))))
    req = tb.Request(
        {"text_input": text("Colour?"), "max_tokens": np.array([[20]], np.int32), "conv_mode": text("chatml_direct")}
    )
    try:
        asyncio.run(model.execute([req]))
    finally:
        model.finalize()
    ((response, flags),) = req.sender.sent
    assert flags == tb.FINAL and not response.has_error()
    assert not any("prompt_table_extra_ids" in i for m, i in tb.bls_calls if m == "tensorrt_llm")
    assert response.output("text_output")[0, 0].decode() == "Red."


# ---- teardown ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vision_encoder", "tensorrt_llm_cpu", "mgm_bls"])
def test_finalize_releases_every_metric_family(stub, llama_dir, monkeypatch, name):
    """A family alive when the stub itself is torn down is cleared through freed shared memory: the
    stub segfaulted on every exit. finalize must let go of them, and a late count is a no-op."""
    import gc

    if name == "vision_encoder":
        fake_artifact(monkeypatch, MGMConfig.from_model_dir(llama_dir))
    model = start(name, tb.model_config(name, **values(llama_dir)))
    assert len(tb.metric_families) > 0
    model.finalize()
    if hasattr(model.metrics, "failed"):
        model.metrics.failed(RuntimeError("late"))  # a request still ending during the unload
        model.metrics.cancelled()
    gc.collect()
    assert dict(tb.metric_families) == {}
