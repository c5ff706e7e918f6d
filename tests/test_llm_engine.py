"""CPU LLM engine (triton_models.lib.engine): parity with mgm_ref, in-flight batching, cancellation,
error isolation, seeded sampling, queueing, validation and the batched sampler."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mgm_ref.constants import IMAGE_TOKEN_INDEX
from mgm_ref.conversation import build_prompt
from mgm_ref.loader import load_model
from mgm_ref.model import GenerationParams
from mgm_ref.tokenization import tokenizer_image_token
from tests.helpers.images import random_image
from triton_models.lib import attention
from triton_models.lib.engine import EngineShutdown, GenerationRequest, LLMEngine
from triton_models.lib.sampling import RowSampling, sample_next

Q = "What is in the picture?"


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    cache = {}

    def get(llm: str):
        if llm not in cache:
            cache[llm] = load_model(tiny_checkpoints(llm))
        return cache[llm]

    return get


@pytest.fixture
def engine_factory():
    engines = []

    def make(llm, **kw):
        engines.append(LLMEngine(llm, **kw))
        return engines[-1]

    yield make
    for e in engines:
        e.shutdown()
        assert not e.alive


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.001)


def random_request(model, key: int, text_len: int, table_rows: int = 24, **kw) -> GenerationRequest:
    """Random text ids with a random prompt table spliced in after the first 3 ids (diverse outputs)."""
    g = torch.Generator().manual_seed(key)
    vocab, hidden = model.llm.config.vocab_size, model.llm.config.hidden_size
    ids = torch.randint(3, vocab, (text_len,), generator=g).tolist()
    table = torch.randn(table_rows, hidden, generator=g)
    return GenerationRequest(
        ids[:3] + list(range(vocab, vocab + table_rows)) + ids[3:], table, request_id=f"r{key}", **kw
    )


# ---- parity with the reference -------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["llama", "gemma", "mixtral"])
def test_greedy_image_prompt_matches_mgm_ref(models, engine_factory, llm):
    model = models(llm)
    feats = model.image_features([random_image(seed=1)])
    ids = tokenizer_image_token(build_prompt(model.conv_mode, Q), model.tokenizer)
    vocab = model.llm.config.vocab_size
    k = ids.index(IMAGE_TOKEN_INDEX)
    fake_ids = ids[:k] + list(range(vocab, vocab + feats.shape[1])) + ids[k + 1 :]
    n = 16
    ref = model.generate([ids], feats, GenerationParams(max_new_tokens=n, temperature=0))[0]
    engine = engine_factory(model.llm, max_batch_size=2)
    handle = engine.submit(GenerationRequest(fake_ids, feats[0], max_new_tokens=n, stop_ids=model.stop_token_ids()))
    streamed = list(handle)  # the handle streams token by token
    assert streamed == ref and handle.tokens == ref and len(ref) > 0
    assert handle.finish_reason in ("stop", "length")
    assert engine.stats["prefills"] == 1 and engine.stats["tokens_generated"] >= len(ref)


def test_callback_and_poll_deliver_the_same_stream(models, engine_factory):
    model = models("llama")
    engine = engine_factory(model.llm, max_batch_size=2)
    req = random_request(model, 9, 15, max_new_tokens=10)
    expected = engine.generate(req)
    events, ended = [], threading.Event()

    def on_token(handle, token, final):
        events.append((token, final, threading.current_thread().name))
        if final:
            ended.set()

    polled, handle = [], engine.submit(req, callback=on_token)
    done = False
    while not done:
        new, done = handle.poll()
        polled += new
        time.sleep(0.001)
    assert ended.wait(10) and polled == expected
    assert [t for t, final, _ in events if not final] == expected and events[-1][:2] == (None, True)
    assert {name for *_, name in events} == {"llm-engine"}
    # a callback that raises is logged, never breaks the engine
    bad = engine.submit(req, callback=lambda *a: 1 / 0)
    assert bad.result(timeout=30) == expected and engine.alive


# ---- in-flight batching --------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["llama", "gemma", "mixtral"])
def test_in_flight_requests_get_their_solo_tokens(models, engine_factory, llm):
    model = models(llm)
    # short, long, medium, longest prompts: newcomers both shorter and longer than the running batch;
    # different max_new_tokens so rows leave at different times; greedy and sampled rows mixed
    reqs = [
        random_request(model, 0, 8, max_new_tokens=30),
        random_request(model, 1, 60, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11),
        random_request(model, 2, 25, max_new_tokens=24, temperature=1.0, top_k=20, seed=12),
        random_request(model, 3, 90, max_new_tokens=18),
    ]
    engine = engine_factory(model.llm, max_batch_size=4)
    solo = [engine.generate(r) for r in reqs]
    assert engine.stats["max_batch_seen"] == 1
    assert len({tuple(s) for s in solo}) == 4 and all(
        len(s) == r.max_new_tokens for s, r in zip(solo, reqs, strict=True)
    )

    handles = []
    for r in reqs:  # each newcomer joins while the earlier ones are decoding
        handles.append(engine.submit(r))
        wait_for(lambda: len(handles[-1].tokens) >= 3 or handles[-1].done)
    assert [h.result(timeout=30) for h in handles] == solo
    assert engine.stats["max_batch_seen"] >= 3 and engine.stats["batched_steps"] > 5
    assert engine.cache.moved_columns > 0  # a longer newcomer shifted the running rows
    assert engine.num_active == 0 and engine.cache.batch == 0


def test_engine_keeps_the_callers_attention_backend_and_native_gqa_matches_sdpa(models):
    model = models("gemma")  # MQA: 4 query heads share 1 K/V head
    llm = model.llm
    assert llm.config._attn_implementation == "sdpa"
    embeds = torch.randn(2, 9, llm.config.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row: "sdpa" then repeats K/V, the native backend does not
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    reqs = [random_request(model, 0, 8, max_new_tokens=12), random_request(model, 1, 30, max_new_tokens=9)]
    with torch.inference_mode():
        expected = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    with LLMEngine(llm, max_batch_size=2) as engine:
        assert llm.config._attn_implementation == "sdpa"
        handles = [engine.submit(r) for r in reqs]
        sdpa_tokens = [h.result(timeout=60) for h in handles]
    assert llm.config._attn_implementation == "sdpa"
    try:
        assert attention.use_native_gqa(llm, "cpu")
        with torch.inference_mode():
            got = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1, 4:], expected[1, 4:], rtol=1e-5, atol=1e-5)
        with LLMEngine(llm, max_batch_size=2) as engine:
            handles = [engine.submit(r) for r in reqs]
            assert [h.result(timeout=60) for h in handles] == sdpa_tokens
        assert llm.config._attn_implementation == attention.NAME
    finally:
        llm.set_attn_implementation("sdpa")


def test_sampling_leaves_the_global_rngs_alone(models, engine_factory):
    import random

    model = models("llama")
    engine = engine_factory(model.llm)
    torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    unseeded = [engine.generate(random_request(model, 3, 10, max_new_tokens=8, temperature=1.0)) for _ in range(2)]
    seeded = engine.generate(random_request(model, 3, 10, max_new_tokens=8, temperature=1.0, seed=5))
    assert torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == py_state
    assert engine.generate(random_request(model, 3, 10, max_new_tokens=8, temperature=1.0, seed=5)) == seeded
    assert unseeded[0] != unseeded[1]  # unseeded requests draw fresh entropy


def test_chunked_prefill_keeps_running_streams_flowing(models, engine_factory):
    model = models("llama")
    engine = engine_factory(model.llm, max_batch_size=4, prefill_chunk=16)
    runner = random_request(model, 0, 8, max_new_tokens=400)
    newcomer = random_request(model, 1, 200, table_rows=100, max_new_tokens=12)  # 300 prompt tokens
    solo = engine.generate(newcomer)
    whole = engine_factory(model.llm, prefill_chunk=None).generate(newcomer)
    assert solo == whole  # chunked and whole prefill agree on this prompt
    running = engine.submit(runner)
    wait_for(lambda: len(running.tokens) >= 2)
    before, at_first_token = len(running.tokens), []

    def on_token(handle, token, final):  # runs in the engine thread: an exact count
        if token is not None and not at_first_token:
            at_first_token.append(len(running.tokens))

    late = engine.submit(newcomer, callback=on_token)
    assert late.result(timeout=30) == solo
    # the 300-token prompt took 19 turns of 16 tokens; the runner decoded a token in each of them
    assert at_first_token[0] - before >= 15
    running.cancel()
    assert engine.stats["prefill_tokens"] >= 2 * 300


def test_queueing_beyond_max_batch_size(models, engine_factory):
    model = models("llama")
    reqs = [random_request(model, s, 5 + 7 * s, max_new_tokens=6 + s) for s in range(5)]
    engine = engine_factory(model.llm, max_batch_size=2)
    solo = [engine.generate(r) for r in reqs]
    handles = [engine.submit(r) for r in reqs]
    assert [h.result(timeout=30) for h in handles] == solo
    assert engine.stats["max_batch_seen"] == 2 and engine.stats["completed"] == 10


# ---- cancellation, errors, shutdown --------------------------------------------------------------
def test_cancel_frees_the_slot(models, engine_factory):
    model = models("llama")
    engine = engine_factory(model.llm, max_batch_size=1)
    long = engine.submit(random_request(model, 0, 10, max_new_tokens=4000))
    waiting = engine.submit(random_request(model, 1, 10, max_new_tokens=5))
    dropped = engine.submit(random_request(model, 2, 10, max_new_tokens=5))
    wait_for(lambda: len(long.tokens) >= 2)
    assert not waiting.tokens and engine.num_pending == 2  # queued behind the only slot
    dropped.cancel()  # cancelled while still queued
    long.cancel()  # cancelled while running: its slot goes to `waiting`
    assert len(waiting.result(timeout=30)) == 5
    got = list(long)
    assert long.finish_reason == "cancelled" and 2 <= len(got) < 4000
    assert dropped.result(timeout=5) == [] and dropped.finish_reason == "cancelled"
    assert engine.stats["cancelled"] == 2 and engine.num_active == 0


def test_bad_request_fails_alone(models, engine_factory):
    model = models("gemma")
    good = [random_request(model, s, 12 + 9 * s, max_new_tokens=15) for s in range(3)]
    engine = engine_factory(model.llm, max_batch_size=4)
    solo = [engine.generate(r) for r in good]
    bad = random_request(model, 7, 10, max_new_tokens=15)
    bad.prompt_table[3, 5] = float("nan")  # only detectable inside the engine
    handles = [engine.submit(good[0]), engine.submit(bad), engine.submit(good[1])]
    wait_for(lambda: len(handles[0].tokens) >= 2)
    handles.append(engine.submit(good[2]))
    with pytest.raises(ValueError, match="non-finite"):
        list(handles[1])
    assert handles[1].finish_reason == "error"
    assert [h.result(timeout=30) for h in (handles[0], handles[2], handles[3])] == solo
    assert engine.alive and engine.stats["failed"] == 1

    # an unexpected exception inside one request's prefill is isolated the same way
    original = engine._embed_prompt

    def flaky(handle, *args):
        if handle.request_id == "boom":
            raise RuntimeError("boom")
        return original(handle, *args)

    engine._embed_prompt = flaky
    boom = engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=3, request_id="boom"))
    fine = engine.submit(good[0])
    with pytest.raises(RuntimeError, match="boom"):
        boom.result(timeout=30)
    assert fine.result(timeout=30) == solo[0]


def test_submit_validation(models, engine_factory):
    model = models("llama")
    engine = engine_factory(model.llm)
    vocab, hidden = model.llm.config.vocab_size, model.llm.config.hidden_size
    table = torch.zeros(4, hidden)
    cases = [
        (GenerationRequest([]), "empty"),
        (GenerationRequest([1, IMAGE_TOKEN_INDEX, 2]), "negative id"),
        (GenerationRequest([1, vocab]), "no prompt_table"),
        (GenerationRequest([1, vocab + 4], table), "row 4 but the table has 4 rows"),
        (GenerationRequest([1, vocab], torch.zeros(4, hidden + 1)), r"prompt_table must be \(rows, 128\)"),
        (GenerationRequest([1, vocab], torch.zeros(4 * hidden)), "prompt_table must be"),
        (GenerationRequest([1.5, 2]), "integers"),
        (GenerationRequest([1, 2], max_new_tokens=0), "max_new_tokens"),
        (GenerationRequest([1] * 100, max_new_tokens=8100), "exceeds the model's 8192 positions"),
        (GenerationRequest([1], temperature=-1), "temperature"),
        (GenerationRequest([1], temperature=float("nan")), "temperature"),
        (GenerationRequest([1], top_p=0), "top_p"),
        (GenerationRequest([1], top_p=1.5), "top_p"),
        (GenerationRequest([1], top_k=-1), "top_k"),
        (GenerationRequest([1], seed="x"), "seed"),
    ]
    for req, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.submit(req)
    import numpy as np  # values straight from Triton inputs (numpy arrays / scalars) are accepted

    engine.generate(
        GenerationRequest(
            np.array([1, vocab + 3, 2], np.int32),
            table.numpy(),
            max_new_tokens=np.int64(2),
            temperature=0.5,
            top_k=np.int32(3),
            seed=np.uint64(7),
        )
    )
    assert engine.generate(GenerationRequest([1, vocab + 3, 2], table, max_new_tokens=2)) is not None
    assert engine.stats["failed"] == 0


def test_stop_ids_end_generation_and_are_not_returned(models, engine_factory):
    model = models("llama")
    engine = engine_factory(model.llm)
    req = random_request(model, 4, 20, max_new_tokens=20)
    full = engine.generate(req)
    stop = full[5]
    first = full.index(stop)
    req.stop_ids = [stop]
    handle = engine.submit(req)
    assert handle.result(timeout=30) == full[:first] and handle.finish_reason == "stop"


def test_shutdown_ends_pending_requests(models):
    model = models("llama")
    engine = LLMEngine(model.llm, max_batch_size=1)
    running = engine.submit(random_request(model, 0, 10, max_new_tokens=4000))
    queued = engine.submit(random_request(model, 1, 10, max_new_tokens=5))
    wait_for(lambda: len(running.tokens) >= 1)
    engine.shutdown()
    assert not engine.alive
    for h in (running, queued):
        with pytest.raises(EngineShutdown):
            h.result(timeout=5)
    with pytest.raises(EngineShutdown):
        engine.submit(GenerationRequest([1, 2]))


# ---- sampling ------------------------------------------------------------------------------------
def test_seeded_sampling_does_not_depend_on_batch_mates(models, engine_factory):
    model = models("mixtral")
    engine = engine_factory(model.llm, max_batch_size=4)
    target = random_request(model, 5, 30, max_new_tokens=20, temperature=0.9, seed=1234)
    alone = engine.generate(target)
    assert engine.generate(target) == alone
    other_seed = engine.generate(random_request(model, 5, 30, max_new_tokens=20, temperature=0.9, seed=99))
    assert other_seed != alone
    mates = [
        random_request(model, 6, 50, max_new_tokens=25, temperature=1.2, top_k=8, seed=1),
        random_request(model, 7, 9, max_new_tokens=25, temperature=0.7, top_p=0.8, seed=2),
        random_request(model, 8, 70, max_new_tokens=25),
    ]
    handles = [engine.submit(m) for m in mates[:2]]
    wait_for(lambda: len(handles[0].tokens) >= 2)
    mine = engine.submit(target)
    handles.append(engine.submit(mates[2]))
    assert mine.result(timeout=30) == alone
    for h in handles:
        h.result(timeout=30)
    assert engine.stats["max_batch_seen"] >= 3


def test_sampler_follows_hf_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    vocab, draws = 50, 3000
    logits = torch.randn(vocab) * 2
    for temperature, top_k, top_p in [(0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 10, 0.5), (0.9, 0, 1.0)]:
        scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = torch.softmax(scores, -1)[0]
        rows = [RowSampling(temperature, top_p, top_k, torch.Generator().manual_seed(i)) for i in range(draws)]
        picked = sample_next(logits.expand(draws, vocab).clone(), rows)
        freq = torch.bincount(picked, minlength=vocab).float() / draws
        assert set(picked.tolist()) <= set(torch.nonzero(expected).flatten().tolist())
        assert (freq - expected).abs().max() < 0.04, (temperature, top_k, top_p)
    # greedy rows take the argmax; one row's draw depends only on its own generator
    mixed = [RowSampling(0.0), RowSampling(1.0, generator=torch.Generator().manual_seed(3))]
    batch = torch.stack([logits, logits.flip(0)])
    out = sample_next(batch.clone(), mixed)
    assert out[0] == logits.argmax()
    assert out[1] == sample_next(batch[1:].clone(), [RowSampling(1.0, generator=torch.Generator().manual_seed(3))])[0]
