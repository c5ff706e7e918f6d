"""Prefix KV reuse in the CPU engine: every cached answer equals mgm_ref's uncached greedy answer (multi-turn
chats, HD, several images, concurrent chats, chunked prefill, a tiny budget with eviction), image rows are
keyed by their extra ids (no false sharing), and the cache's byte count is what it holds."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mgm_ref.constants import IMAGE_TOKEN_INDEX
from mgm_ref.conversation import build_prompt
from mgm_ref.loader import load_model
from mgm_ref.model import GenerationParams
from mgm_runtime.prompt_table import embed_with_prompt_table
from tests.helpers.images import random_image
from triton_models.lib.engine import GenerationRequest, LLMEngine, PrefixCache
from triton_models.lib.engine import prefix_cache as prefix_cache_module
from triton_models.lib.engine.prefix_cache import block_keys, keyable_length

QUESTIONS = ["What is in the picture?", "Describe it in more detail.", "What colours do you see?", "Thanks!"]
NEW_TOKENS = 12
BLOCK = 16


def image_key(seed: int) -> int:
    """An image's extra id as preprocessing writes it: 64 bits of its key, top bit set (never 0)."""
    return int(np.random.default_rng(seed).integers(0, 2**63, dtype=np.uint64)) | (1 << 63)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    cache = {}

    def get(llm: str, hd: bool = False):
        if (llm, hd) not in cache:
            cache[llm, hd] = load_model(tiny_checkpoints(llm, hd=hd))
        return cache[llm, hd]

    return get


@pytest.fixture
def engines():
    made = []

    def make(llm, budget_bytes: int | None = 64 << 20, **kw):
        cache = None if budget_bytes is None else PrefixCache(BLOCK, budget_bytes)
        kw.setdefault("min_reuse_fraction", 0.0)  # exercise every reuse, however short
        made.append(LLMEngine(llm, prefix_cache=cache, **kw))
        return made[-1]

    yield make
    for e in made:
        e.shutdown()


class Chat:
    """One chat about images: each turn's prompt (history as text, like every client sends it), the
    engine request for it and mgm_ref's uncached greedy answer."""

    def __init__(self, model, image_seeds=(1,), random_rows: bool = False):
        self.model, self.history = model, []
        self.feats = model.image_features([random_image(seed=s) for s in image_seeds])
        if random_rows:  # rows far apart from any image's: answers that surely differ per "image"
            g = torch.Generator().manual_seed(image_seeds[0])
            self.feats = torch.randn(self.feats.shape, generator=g)
        self.keys = [image_key(s) for s in image_seeds]

    def prompt_ids(self, question: str) -> list[int]:
        n = self.feats.shape[0]
        return self.model.tokenize(build_prompt(self.model.conv_mode, question, n, history=self.history))

    def request(self, ids: list[int], extra: bool = True, **kw) -> GenerationRequest:
        vocab, rows = self.model.llm.config.vocab_size, self.feats.shape[1]
        fake, extra_ids, k = [], [], 0
        for t in ids:
            if t == IMAGE_TOKEN_INDEX:  # image k: rows k*rows.. of the table, keyed by image k's key
                fake += range(vocab + k * rows, vocab + (k + 1) * rows)
                extra_ids += [self.keys[k]] * rows
                k += 1
            else:
                fake.append(t)
                extra_ids.append(0)
        table = self.feats.reshape(-1, self.feats.shape[-1])
        kw.setdefault("max_new_tokens", NEW_TOKENS)
        kw.setdefault("stop_ids", self.model.stop_token_ids())
        return GenerationRequest(fake, table, extra_ids=extra_ids if extra else None, **kw)

    def reference(self, ids: list[int]) -> list[int]:
        params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0)
        return self.model.generate([ids], self.feats, params)[0]

    def answered(self, question: str, tokens: list[int]) -> None:
        self.history.append((question, self.model.tokenizer.decode(tokens, skip_special_tokens=True)))


# ---- keys and the cache itself -------------------------------------------------------------------
def test_block_keys_stand_for_their_whole_prefix():
    ids = np.arange(100, 164)
    keys = block_keys(ids, None, 16, vocab_size=1000)
    assert len(keys) == 4 and len(set(keys)) == 4
    changed = ids.copy()
    changed[3] += 1  # a change in block 0 changes every later key
    assert not set(block_keys(changed, None, 16, 1000)) & set(keys)
    tail = ids.copy()
    tail[40] += 1  # a change in block 2 keeps blocks 0 and 1
    assert block_keys(tail, None, 16, 1000)[:2] == keys[:2] and block_keys(tail, None, 16, 1000)[2:] != keys[2:]
    assert len(block_keys(ids[:31], None, 16, 1000)) == 1  # only full blocks


def test_fake_ids_are_keyed_by_their_extra_ids_only():
    vocab = 1000
    ids = np.array([5, 6, 7] + list(range(vocab, vocab + 29)) + [8] * 32)
    assert keyable_length(ids, None, vocab) == 3  # no extra ids: nothing past the first fake id
    a = np.array([0] * 3 + [image_key(1)] * 29 + [0] * 32, np.uint64)
    b = np.array([0] * 3 + [image_key(2)] * 29 + [0] * 32, np.uint64)
    assert keyable_length(ids, a, vocab) == ids.size
    ka, kb = block_keys(ids, a, 16, vocab), block_keys(ids, b, 16, vocab)
    assert len(ka) == 4 and not set(ka) & set(kb)  # same ids, different images: no block in common
    zero_at_image = a.copy()
    zero_at_image[10] = 0  # an image row without its key ends the keyable part
    assert keyable_length(ids, zero_at_image, vocab) == 10


def kv(base: float):
    return lambda i: torch.full((2, 2, 2, 4, 8), float(base + i))  # 1 KiB per block


def test_lru_eviction_stays_within_the_budget_and_shared_prefixes_outlive_branches():
    block_bytes = kv(0)(0).nbytes
    cache = PrefixCache(block_tokens=4, budget_bytes=5 * block_bytes)
    trunk = np.arange(8)  # 2 blocks both branches share
    left = block_keys(np.r_[trunk, np.arange(100, 108)], None, 4, 10**6)
    right = block_keys(np.r_[trunk, np.arange(200, 212)], None, 4, 10**6)
    assert left[:2] == right[:2]
    assert cache.insert(left, kv(0)) == 4
    # right needs 3 new blocks: left's two leaves (least recently used) go, the shared trunk stays
    assert cache.insert(right, kv(10)) == 3
    assert all(k in cache for k in right) and not any(k in cache for k in left[2:])
    assert cache.bytes == cache.held_bytes() == 5 * block_bytes and cache.stats["evicted_blocks"] == 2
    assert [float(b[0, 0, 0, 0, 0]) for b in cache.match(right)] == [0, 1, 12, 13, 14]
    assert len(cache.match(left)) == 2 and cache.stats["miss_blocks"] == 2
    # a chain longer than the budget keeps its first blocks; evicting a block takes its descendants
    other = block_keys(np.arange(500, 528), None, 4, 10**6)
    assert cache.insert(other, kv(20)) == 5
    assert set(cache._blocks) == set(other[:5]) and cache.stats["evicted_blocks"] == 7
    # a view of a big buffer is stored as its own copy: the byte count is what is held
    big = torch.zeros(2, 2, 2, 400, 8)
    assert cache.insert(block_keys(np.arange(50, 54), None, 4, 10**6), lambda i: big[:, :, :, :4]) == 1
    assert cache.held_bytes() == cache.bytes == 5 * block_bytes
    assert PrefixCache(4, budget_bytes=0).insert(left, kv(0)) == 0  # budget 0: nothing is kept


# ---- answers equal the uncached reference --------------------------------------------------------
@pytest.mark.parametrize("llm,hd", [("llama", False), ("gemma", False), ("mixtral", False), ("llama", True)])
def test_chat_turns_match_mgm_ref(models, engines, llm, hd):
    model = models(llm, hd)
    chat, engine = Chat(model), engines(model.llm, max_batch_size=2)
    rows = chat.feats.shape[1]
    for turn, question in enumerate(QUESTIONS):
        ids = chat.prompt_ids(question)
        before = engine.stats["reused_tokens"]
        got = engine.generate(chat.request(ids), timeout=120)
        assert got == chat.reference(ids), f"turn {turn + 1}"
        reused = engine.stats["reused_tokens"] - before
        if turn:  # the image rows and the earlier turns come from the cache
            assert reused >= rows and reused % BLOCK == 0 and reused < len(chat.request(ids).input_ids)
        else:
            assert reused == 0
        chat.answered(question, got)


def test_token_level_history_reuses_the_previous_answer(models, engines):
    model = models("llama")
    chat, engine = Chat(model), engines(model.llm)
    first = chat.prompt_ids(QUESTIONS[0])
    handle = engine.submit(chat.request(first, stop_ids=[]))  # no stop: every answer token but the last is fed
    answer = handle.result(timeout=60)
    assert answer == chat.reference(first)[: len(answer)] and len(answer) == NEW_TOKENS
    follow = first + answer + model.tokenizer.encode(" And more?", add_special_tokens=False)
    before = engine.stats["reused_tokens"]
    req = chat.request(follow)
    assert engine.generate(req, timeout=60) == chat.reference(follow)
    fed = len(chat.request(first).input_ids) + len(answer) - 1
    assert engine.stats["reused_tokens"] - before == fed // BLOCK * BLOCK > len(chat.request(first).input_ids)


def test_a_left_padded_row_caches_its_own_columns(models, engines):
    """A row that leaves a batch while left-padded (a longer row beside it) caches the right columns."""
    model = models("llama")
    chat, engine = Chat(model), engines(model.llm, max_batch_size=2)
    short = chat.prompt_ids(QUESTIONS[0])
    long = short + model.tokenizer.encode(" and tell me everything you can about it" * 4, add_special_tokens=False)
    handles = [engine.submit(chat.request(short, stop_ids=[])), engine.submit(chat.request(long, max_new_tokens=40))]
    answer = handles[0].result(timeout=60)
    handles[1].result(timeout=60)
    assert engine.stats["max_batch_seen"] == 2 and len(answer) == NEW_TOKENS
    # every cached block of prompt + fed answer tokens holds the KV a solo prefill computes
    req = chat.request(short)
    seq = torch.tensor(req.input_ids + answer[:-1])
    extra = np.r_[np.array(req.extra_ids, np.uint64), np.zeros(len(answer) - 1, np.uint64)]
    cached = engine.prefix_cache.match(block_keys(seq.numpy(), extra, BLOCK, model.llm.config.vocab_size))
    with torch.inference_mode():
        embeds = embed_with_prompt_table(
            seq, model.llm.get_input_embeddings(), req.prompt_table, model.llm.config.vocab_size
        )
        solo = model.llm(inputs_embeds=embeds[None], use_cache=True).past_key_values
    assert len(cached) == seq.numel() // BLOCK
    for i, block in enumerate(cached):
        for layer, kv in enumerate(solo.layers):
            cols = slice(i * BLOCK, (i + 1) * BLOCK)
            torch.testing.assert_close(block[layer, 0], kv.keys[0, :, cols], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(block[layer, 1], kv.values[0, :, cols], rtol=1e-4, atol=1e-4)
    follow = short + answer + model.tokenizer.encode(" Why?", add_special_tokens=False)
    before = engine.stats["reused_tokens"]
    assert engine.generate(chat.request(follow), timeout=60) == chat.reference(follow)
    fed = len(chat.request(short).input_ids) + len(answer) - 1
    assert engine.stats["reused_tokens"] - before == fed // BLOCK * BLOCK > len(chat.request(short).input_ids)


def test_seeded_samples_are_identical_with_and_without_reuse(models, engines):
    model = models("mixtral")
    runs = []
    for budget in (None, 64 << 20):
        chat, engine = Chat(model), engines(model.llm, budget_bytes=budget)
        tokens = []
        for question in QUESTIONS[:3]:
            got = engine.generate(chat.request(chat.prompt_ids(question), temperature=0.9, top_k=20, seed=7))
            tokens.append(got)
            chat.answered(question, got)
        runs.append((tokens, engine.stats["reused_tokens"]))
    (plain, none_reused), (cached, reused) = runs
    assert cached == plain and none_reused == 0 and reused > 0


def test_two_images_at_the_same_positions_never_share_kv(models, engines):
    model = models("llama")
    a, b = Chat(model, (1,), random_rows=True), Chat(model, (2,), random_rows=True)
    ids = a.prompt_ids(QUESTIONS[0])
    assert ids == b.prompt_ids(QUESTIONS[0]) and a.reference(ids) != b.reference(ids)
    engine = engines(model.llm)
    assert engine.generate(a.request(ids)) == a.reference(ids)
    first_image = ids.index(IMAGE_TOKEN_INDEX)
    before = engine.stats["reused_tokens"]
    assert engine.generate(b.request(ids)) == b.reference(ids)
    assert engine.stats["reused_tokens"] - before == first_image // BLOCK * BLOCK  # the text before it only
    before = engine.stats["reused_tokens"]
    assert engine.generate(a.request(ids)) == a.reference(ids)  # a again: its image rows are reused
    assert engine.stats["reused_tokens"] - before > a.feats.shape[1]


def test_ignoring_extra_ids_would_share_kv_falsely(models, engines, monkeypatch):
    """The check above has teeth: keyed by fake ids alone, b reuses a's image rows and answers wrong."""
    model = models("llama")
    a, b = Chat(model, (1,), random_rows=True), Chat(model, (2,), random_rows=True)
    ids = a.prompt_ids(QUESTIONS[0])
    monkeypatch.setattr(prefix_cache_module, "keyable_length", lambda ids, extra, vocab: int(ids.size))
    engine = engines(model.llm)
    engine.generate(a.request(ids, extra=False))
    wrong = engine.generate(b.request(ids, extra=False))
    assert engine.stats["reused_tokens"] > ids.index(IMAGE_TOKEN_INDEX) + a.feats.shape[1] // 2
    assert wrong != b.reference(ids)


def test_without_extra_ids_nothing_past_the_first_fake_id_is_reused(models, engines):
    model = models("llama")
    chat, engine = Chat(model, (1, 2)), engines(model.llm)  # two images in one request
    ids = chat.prompt_ids(QUESTIONS[0])
    for _ in range(2):
        before = engine.stats["reused_tokens"]
        assert engine.generate(chat.request(ids, extra=False)) == chat.reference(ids)
        assert engine.stats["reused_tokens"] - before <= ids.index(IMAGE_TOKEN_INDEX)
    before = engine.stats["reused_tokens"]
    assert engine.generate(chat.request(ids)) == chat.reference(ids)  # with extra ids: both images
    engine.generate(chat.request(ids))
    assert engine.stats["reused_tokens"] - before >= 2 * chat.feats.shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("prefill_chunk", [None, 24])
def test_concurrent_chats_match_mgm_ref(models, engines, prefill_chunk):
    model = models("gemma")
    chats = [Chat(model, (s % 3,)) for s in range(6)]  # 3 images, 2 chats each
    engine = engines(model.llm, max_batch_size=4, prefill_chunk=prefill_chunk)
    for question in QUESTIONS[:3]:
        prompts = [c.prompt_ids(question) for c in chats]
        handles = [engine.submit(c.request(p)) for c, p in zip(chats, prompts, strict=True)]
        answers = [h.result(timeout=120) for h in handles]
        assert answers == [c.reference(p) for c, p in zip(chats, prompts, strict=True)], question
        for c, got in zip(chats, answers, strict=True):
            c.answered(question, got)
    assert engine.stats["max_batch_seen"] >= 3 and engine.stats["reused_tokens"] > 6 * chats[0].feats.shape[1]


def test_a_tiny_budget_evicts_and_answers_stay_exact(models, engines):
    model = models("llama")
    cfg = model.llm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    block_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * BLOCK * head_dim * 4
    budget = 30 * block_bytes  # less than one chat's turn
    engine = engines(model.llm, budget_bytes=budget, max_batch_size=3)
    chats = [Chat(model, (s,)) for s in range(3)]
    for question in QUESTIONS[:3]:
        prompts = [c.prompt_ids(question) for c in chats]
        handles = [engine.submit(c.request(p)) for c, p in zip(chats, prompts, strict=True)]
        answers = [h.result(timeout=120) for h in handles]
        assert answers == [c.reference(p) for c, p in zip(chats, prompts, strict=True)]
        for c, got in zip(chats, answers, strict=True):
            c.answered(question, got)
        pc = engine.prefix_cache
        assert pc.held_bytes() == pc.bytes <= budget and len(pc) * block_bytes == pc.bytes
    assert engine.stats["reused_tokens"] > 0 and engine.prefix_cache.stats["evicted_blocks"] > 0


def test_failures_cache_nothing_and_cancelled_rows_are_kept(models, engines):
    model = models("llama")
    chat, engine = Chat(model), engines(model.llm)
    ids = chat.prompt_ids(QUESTIONS[0])
    bad = chat.request(ids)
    bad.prompt_table = bad.prompt_table.clone()
    bad.prompt_table[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        engine.generate(bad)
    assert len(engine.prefix_cache) == 0  # a failed request leaves nothing behind
    assert engine.generate(chat.request(ids)) == chat.reference(ids)
    blocks_after_one = len(engine.prefix_cache)
    long = engine.submit(chat.request(ids + [5] * 40, max_new_tokens=4000, stop_ids=[]))
    while len(long.tokens) < 3 * BLOCK:
        time.sleep(0.001)
    long.cancel()
    long.result(timeout=60)
    assert long.finish_reason == "cancelled" and len(engine.prefix_cache) >= blocks_after_one + 4
    with pytest.raises(ValueError, match="one per input id"):
        engine.submit(GenerationRequest([1, 2, 3], extra_ids=[0, 0]))
    with pytest.raises(ValueError, match="2\\*\\*64"):
        engine.submit(GenerationRequest([1, 2], extra_ids=[0, -1]))
    assert engine.generate(GenerationRequest([1, 2], max_new_tokens=1, extra_ids=[0, 2**64 - 1])) is not None


def test_a_short_cached_prefix_is_not_worth_its_masked_prefill(models, engines):
    """By default a cached prefix under half the prompt (the text before a new image) is not used."""
    model = models("llama")
    a, b = Chat(model, (1,)), Chat(model, (2,))
    engine = engines(model.llm, min_reuse_fraction=0.5)
    ids = a.prompt_ids(QUESTIONS[0])
    assert engine.generate(a.request(ids)) == a.reference(ids)
    hits = engine.prefix_cache.stats["hit_blocks"]
    assert engine.generate(b.request(ids)) == b.reference(ids)
    assert engine.stats["reused_tokens"] == 0 and engine.prefix_cache.stats["hit_blocks"] == hits  # all misses
    a.answered(QUESTIONS[0], engine.generate(a.request(ids)))
    follow = a.prompt_ids(QUESTIONS[1])  # a's image and first turn: most of the prompt
    assert engine.generate(a.request(follow)) == a.reference(follow)
    assert engine.stats["reused_tokens"] > len(a.request(follow).input_ids) / 2
    with pytest.raises(ValueError, match="min_reuse_fraction"):
        LLMEngine(model.llm, min_reuse_fraction=1.5)
