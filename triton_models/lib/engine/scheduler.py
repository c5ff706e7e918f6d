"""A Triton-free CPU LLM engine with in-flight batching: the CPU stand-in for TensorRT-LLM's batcher.

One file on purpose: the loop turn (admit, prefill, decode, emit, retire) is one state machine whose
steps share the active/prefilling lists; request types and the KV cache live in their own modules.

One engine thread owns the HF causal LM (LlamaForCausalLM, GemmaForCausalLM, MixtralForCausalLM as
built by `mgm_ref.loader.load_llm`). Each loop turn it

1. drops cancelled requests (their slot is free at once),
2. admits queued requests into free slots (at most `max_batch_size` run or prefill at a time) and
   prefills them one by one, each alone in its own cache (prompt embedded, fake ids spliced from its
   prompt table): whole prompts by default, or at most `prefill_chunk` prompt tokens per turn (chunked
   prefill, so that the running streams keep decoding during a long prompt). With a prefix cache
   (`prefix_cache.PrefixCache`) a prompt starts from its longest cached prefix; every fully
   prefilled prompt and every leaving row (prompt + fed generated tokens) is cached. A finished
   prefill samples the request's first token and merges its KV cache into the running batch,
3. runs ONE batched decode forward for every running request, samples all next tokens in one call,
   streams them to the handles, and removes the finished rows.

Prompts follow TensorRT-LLM's prompt-table convention: an id >= vocab_size is a fake id that takes row
(id - vocab_size) of the request's `prompt_table` (P, H); MGM image features go there, ids
vocab_size .. vocab_size + 575 for one 576-token image. The model is called with `inputs_embeds`, so
Gemma's sqrt(hidden) scaling happens inside the HF model, image rows included, as in mgm_ref.

The batched KV cache (left-padded rows over pre-allocated buffers) is `kv_cache.BatchKVCache`;
requests are validated into `request.ValidRequest`s before they are queued.

The engine runs the model with the attention backend the caller set (`llm.config._attn_implementation`);
it builds its decode masks for that backend and never switches it (for grouped K/V heads on CPU the
caller may choose triton_models.lib.attention's "sdpa_native_gqa").

API (thread-safe; handles are consumed by one thread each):
    engine = LLMEngine(llm, max_batch_size=8, device="cpu", prefix_cache=PrefixCache(16, 1 << 30))
    handle = engine.submit(GenerationRequest(input_ids, prompt_table, max_new_tokens=..., extra_ids=..., ...),
                           callback=None)   # optional callback(handle, token | None, final) in the engine thread
    for token in handle: ...            # streams new ids; raises the request's error, if any
    handle.poll()                       # non-blocking: (new tokens, finished)
    handle.cancel()                     # stops it at the next step, frees the slot
    engine.generate(request)            # -> list[int]
    engine.stats / engine.snapshot()    # counters: steps, batched_steps, max_batch_seen, tokens_generated, ...
    engine.shutdown()

Errors while serving one request (a prompt table with NaNs, an exception during its prefill) end that
request's handle with the exception; the engine thread and the other requests go on. An exception in a
batched decode step can not be attributed to one row: it ends every request of that batch.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from mgm_runtime.prompt_table import embed_with_prompt_table
from triton_models.lib import attention
from triton_models.lib.engine.kv_cache import BatchKVCache
from triton_models.lib.engine.prefix_cache import PrefixCache, block_keys
from triton_models.lib.engine.request import (
    EngineLimits,
    EngineShutdown,
    GenerationRequest,
    RequestHandle,
    TokenCallback,
    validate,
)
from triton_models.lib.sampling import RowSampling, sample_next

log = logging.getLogger(__name__)

__all__ = ["LLMEngine"]


# ---- the engine ----------------------------------------------------------------------------------
@dataclass
class _Active:
    handle: RequestHandle
    sampling: RowSampling
    stops: frozenset
    max_new_tokens: int
    produced: int = 0
    last_token: int = -1
    fed: list[int] = field(default_factory=list)  # generated tokens fed back (their KV is in the row)


@dataclass
class _Prefill:
    state: _Active
    embeds: torch.Tensor | None  # (1, n - start, hidden) spliced prompt from position `start` on
    cache: DynamicCache  # this request's own cache until it joins the batch
    done: int = 0  # prompt tokens prefilled (or taken from the prefix cache) so far
    start: int = 0  # prompt tokens taken from the prefix cache (never embedded)
    keys: list[bytes] = field(default_factory=list)  # the prompt's prefix-cache block keys


class LLMEngine:
    """In-flight batching generation over an HF causal LM, driven by one engine thread."""

    def __init__(
        self,
        llm,
        max_batch_size: int = 8,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        prefill_chunk: int | None = None,
        prefix_cache: PrefixCache | None = None,
        min_reuse_fraction: float = 0.5,
    ):
        """`num_threads`: torch.set_num_threads in the engine thread (process-wide; None leaves it).
        `prefill_chunk`: at most this many prompt tokens are prefilled between two decode steps (chunked
        prefill: running streams keep flowing while a long prompt is prefilled, at some cost in TTFT).
        None: newcomers are prefilled whole before the next decode step (bit-exact with a solo run).
        `prefix_cache`: keep the KV of prefilled prompts and finished sequences there and start each
        prompt from its longest cached prefix (None: every prompt is prefilled whole).
        `min_reuse_fraction`: a cached prefix is used only when it covers at least this share of the
        prompt. A prefill behind a cached prefix runs attention under an explicit mask, which on CPU is
        ~2.5x slower per element than the causal kernel of a prefill from scratch: a short shared
        prefix (a system prompt before a new image) would cost more than it saves.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.llm = llm
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.num_threads = num_threads
        cfg = llm.config
        self.embed = llm.get_input_embeddings()
        self.vocab_size = int(cfg.vocab_size)
        if self.embed.num_embeddings != self.vocab_size:
            raise ValueError(
                f"input embeddings have {self.embed.num_embeddings} rows but vocab_size is {self.vocab_size}"
            )
        self.hidden_size = int(self.embed.embedding_dim)
        self.max_positions = int(cfg.max_position_embeddings)
        self.dtype = self.embed.weight.dtype
        window = getattr(cfg, "sliding_window", None)
        self.sliding_window = window if window and getattr(cfg, "use_sliding_window", True) else None
        self.attn_impl = getattr(cfg, "_attn_implementation", "sdpa") or "sdpa"
        self.limits = EngineLimits(self.vocab_size, self.hidden_size, self.max_positions)
        self.cache = BatchKVCache(int(cfg.num_hidden_layers), max_batch_size)
        self.prefix_cache = prefix_cache
        if not 0 <= min_reuse_fraction <= 1:
            raise ValueError(f"min_reuse_fraction must be in [0, 1], got {min_reuse_fraction}")
        self.min_reuse_fraction = min_reuse_fraction

        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._active: list[_Active] = []
        self._prefilling: list[_Prefill] = []  # admitted (slot reserved), prompt not fully prefilled yet
        self._stop = False
        self.stats: dict[str, int] = dict(
            steps=0,
            batched_steps=0,
            max_batch_seen=0,
            tokens_generated=0,
            prefills=0,
            prefill_tokens=0,
            reused_tokens=0,  # prompt tokens taken from the prefix cache instead of being prefilled
            completed=0,
            cancelled=0,
            failed=0,
        )
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, callback: TokenCallback | None = None) -> RequestHandle:
        """Validate and queue `request`; returns a handle that streams its tokens. ValueError on bad input.

        `callback(handle, token, final)`, if given, is called from the engine thread for every new token
        (final=False) and once at the end (token=None, final=True; see handle.finish_reason / .error):
        e.g. to send streaming responses without a consumer thread. It must be quick and not block.
        """
        handle = RequestHandle(request, validate(request, self.limits), self._cond, callback)
        with self._cond:
            if self._stop:
                raise EngineShutdown("the engine is shut down")
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> list[int]:
        return self.submit(request).result(timeout)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread; unfinished requests end with EngineShutdown."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def snapshot(self) -> dict[str, Any]:
        """Counters plus the current occupancy."""
        return dict(
            self.stats,
            active=len(self._active),
            pending=len(self._pending),
            prefilling=len(self._prefilling),
            cache_length=self.cache.length,
            moved_columns=self.cache.moved_columns,
            **self.prefix_cache_stats(),
        )

    def prefix_cache_stats(self) -> dict[str, int]:
        """The prefix cache's counters (prefix_ prefixed; empty without a prefix cache)."""
        pc = self.prefix_cache
        if pc is None:
            return {}
        return dict(
            {f"prefix_{k}": v for k, v in pc.stats.items()},
            prefix_blocks=len(pc),
            prefix_bytes=pc.bytes,
            prefix_budget_bytes=pc.budget_bytes,
        )

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while True:
                try:
                    self._drop_cancelled()  # frees slots before newcomers are taken
                except Exception as e:
                    log.exception("dropping cancelled requests failed")
                    self._fail_active(e)
                with self._cond:
                    while not self._stop and not self._pending and not self._active and not self._prefilling:
                        self._cond.wait()
                    if self._stop:
                        break
                    newcomers = self._take_newcomers()
                try:
                    for handle in newcomers:
                        self._start_prefill(handle)
                    self._prefill_work()
                    if self._active:
                        self._decode_step()
                except Exception as e:  # a bug in the loop itself: fail the batch, keep serving
                    log.exception("engine step failed")
                    self._fail_active(e)
        self._shutdown_requests()

    def _take_newcomers(self) -> list[RequestHandle]:
        free = self.max_batch_size - len(self._active) - len(self._prefilling)
        out: list[RequestHandle] = []
        while self._pending and len(out) < free:
            out.append(self._pending.popleft())
        # cancelled requests still waiting for a slot leave the queue now
        if any(h.cancelled for h in self._pending):
            kept: collections.deque[RequestHandle] = collections.deque()
            for h in self._pending:
                if h.cancelled:
                    self._end(h, "cancelled")
                else:
                    kept.append(h)
            self._pending = kept
        return out

    def _end(self, handle: RequestHandle, reason: str, error: BaseException | None = None) -> None:
        if handle.done:
            return
        key = {"stop": "completed", "length": "completed", "cancelled": "cancelled"}.get(reason, "failed")
        self.stats[key] += 1
        handle._finish(reason, error)

    def _drop_cancelled(self) -> None:
        if any(p.state.handle.cancelled for p in self._prefilling):
            for p in [p for p in self._prefilling if p.state.handle.cancelled]:
                self._end(p.state.handle, "cancelled")
            self._prefilling = [p for p in self._prefilling if not p.state.handle.done]
        for row in range(len(self._active) - 1, -1, -1):
            if self._active[row].handle.cancelled:
                self._remove(row, "cancelled")
        self.cache.trim()

    def _remove(self, row: int, reason: str, error: BaseException | None = None) -> None:
        state = self._active[row]
        self._keep_row(row)  # a cancelled row's KV is as valid as a finished one's
        self.cache.remove_row(row)
        self._active[row] = self._active[-1]
        self._active.pop()
        self._end(state.handle, reason, error)
        if not self._active:
            self.cache.release()

    def _fail_active(self, error: BaseException) -> None:
        for state in self._active:
            self._end(state.handle, "error", error)
        self._active = []
        self.cache.release()

    def _shutdown_requests(self) -> None:
        with self._cond:
            waiting = list(self._pending)
            self._pending.clear()
        err = EngineShutdown("the engine was shut down before the request finished")
        for h in waiting:
            self._end(h, "shutdown", err)
        for state in self._active + [p.state for p in self._prefilling]:
            self._end(state.handle, "shutdown", err)
        self._active, self._prefilling = [], []
        self.cache.release()

    # ---- prefill / decode ------------------------------------------------------------------------
    def _embed_prompt(self, handle: RequestHandle, start: int = 0) -> torch.Tensor:
        """Embeddings of the prompt from position `start` on (the rows before it come from the cache)."""
        return embed_with_prompt_table(
            handle.valid.ids[start:].to(self.device), self.embed, handle.valid.table, self.vocab_size
        )

    def _start_prefill(self, handle: RequestHandle) -> None:
        if handle.cancelled:
            self._end(handle, "cancelled")
            return
        v = handle.valid
        state = _Active(handle, v.sampling, v.stop_ids, v.max_new_tokens)
        try:
            prefill = _Prefill(state, None, DynamicCache())
            if self.prefix_cache is not None:
                self._reuse_prefix(prefill)
            prefill.start = prefill.done
            prefill.embeds = self._embed_prompt(handle, prefill.start)[None]
        except Exception as e:
            log.info("request %r failed: %s", handle.request_id, e)
            self._end(handle, "error", e)
            return
        self._prefilling.append(prefill)

    # ---- prefix cache ----------------------------------------------------------------------------
    def _reuse_prefix(self, p: _Prefill) -> None:
        """Start `p` from its longest cached prefix (its KV goes into p's own cache)."""
        pc, v = self.prefix_cache, p.state.handle.valid
        assert pc is not None
        p.keys = block_keys(v.ids.numpy(), v.extra_ids, pc.block_tokens, self.vocab_size)
        # at least the last prompt token is prefilled: its logits give the first token
        n = v.ids.numel()
        least = max(1, math.ceil(self.min_reuse_fraction * n))
        p.done = pc.load(p.keys, p.cache, limit=n - 1, device=self.device, min_tokens=least)
        self.stats["reused_tokens"] += p.done

    def _keep_prompt(self, p: _Prefill) -> None:
        """Cache the blocks of a fully prefilled prompt (its own cache holds every column)."""
        if self.prefix_cache is not None:
            layers = [(x.keys[0], x.values[0]) for x in p.cache.layers]  # type: ignore[index]
            self.prefix_cache.insert_columns(p.keys, layers, 0)

    def _keep_row(self, row: int) -> None:
        """Cache the blocks of a leaving row: its prompt plus the generated tokens fed so far."""
        pc = self.prefix_cache
        if pc is None:
            return
        state, c = self._active[row], self.cache
        v, pad = state.handle.valid, c.pads[row]
        if c.length - pad != v.ids.numel() + len(state.fed):  # exactly prompt + fed tokens, or nothing
            log.error("row %d holds %d columns, not prompt + fed tokens: not cached", row, c.length - pad)
            return
        fed = np.asarray(state.fed, np.int64)
        ids = np.concatenate([v.ids.numpy(), fed])
        extra = None if v.extra_ids is None else np.concatenate([v.extra_ids, np.zeros(fed.size, np.uint64)])
        keys = block_keys(ids, extra, pc.block_tokens, self.vocab_size)
        pc.insert_columns(keys, [(x.kbuf[row], x.vbuf[row]) for x in c.layers], pad)  # type: ignore[attr-defined]

    def _prefill_work(self) -> None:
        """Prefill queued prompts, oldest first, within this turn's token budget (prefill_chunk)."""
        budget = self.prefill_chunk if self.prefill_chunk is not None else float("inf")
        while self._prefilling and budget > 0:
            p = self._prefilling[0]
            assert p.embeds is not None
            n = p.start + p.embeds.shape[1]
            take = int(min(n - p.done, budget))
            try:
                positions = torch.arange(p.done, p.done + take, device=self.device)
                out = self.llm(
                    inputs_embeds=p.embeds[:, p.done - p.start : p.done - p.start + take],
                    position_ids=positions[None],
                    past_key_values=p.cache,
                    use_cache=True,
                    cache_position=positions,
                    logits_to_keep=1,
                )
                p.done += take
                budget -= take
                self.stats["prefill_tokens"] += take
                if p.done < n:
                    continue
                self._prefilling.pop(0)
                self.stats["prefills"] += 1
                token = int(sample_next(out.logits[:, -1], [p.state.sampling])[0])
                if self._emit(p.state, token):
                    # a finished prefill has filled every layer's keys and values
                    self.cache.add_row([(layer.keys, layer.values) for layer in p.cache.layers])  # type: ignore[misc]
                    self._active.append(p.state)
            except Exception as e:
                log.info("request %r failed in prefill: %s", p.state.handle.request_id, e)
                if self._prefilling and self._prefilling[0] is p:
                    self._prefilling.pop(0)
                self._end(p.state.handle, "error", e)
                continue
            self._keep_prompt(p)  # after the first token went out: caching costs no TTFT

    def _emit(self, state: _Active, token: int) -> bool:
        """Deliver one token; returns False when the request is finished."""
        state.produced += 1
        self.stats["tokens_generated"] += 1
        if token in state.stops:
            self._end(state.handle, "stop")
            return False
        state.handle._push(token)
        state.last_token = token
        if state.produced >= state.max_new_tokens:
            self._end(state.handle, "length")
            return False
        return True

    def _decode_mask(self) -> torch.Tensor | None:
        c = self.cache
        if not any(c.pads):
            return None  # no padding: HF's own causal / sliding-window logic applies unchanged
        cols = torch.arange(c.length + 1, device=self.device)
        pads = torch.tensor(c.pads, device=self.device)
        allowed = cols[None, :] >= pads[:, None]
        if self.sliding_window is not None:
            allowed &= cols[None, :] > c.length - self.sliding_window
        if self.attn_impl in ("sdpa", attention.NAME):
            return allowed[:, None, None, :]
        if self.attn_impl == "eager":
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None, None, :]
        return allowed.long()  # other attention backends: a 2D padding mask, HF builds the rest

    def _decode_step(self) -> None:
        active, cache = self._active, self.cache
        b, length = len(active), cache.length
        tokens = torch.tensor([s.last_token for s in active], device=self.device)
        for s in active:
            s.fed.append(s.last_token)
        embeds = self.embed(tokens)[:, None, :]
        positions = torch.tensor([length - p for p in cache.pads], device=self.device)[:, None]
        cache.reserve_step()
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=self._decode_mask(),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([length], device=self.device),
            logits_to_keep=1,
        )
        cache.length = length + 1
        next_tokens = sample_next(out.logits[:, -1], [s.sampling for s in active]).tolist()
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], b)
        if b > 1:
            self.stats["batched_steps"] += 1
        finished = [
            row
            for row, (state, token) in enumerate(zip(active, next_tokens, strict=True))
            if not self._emit(state, token)
        ]
        for row in reversed(finished):
            self._remove_finished(row)
        cache.trim()

    def _remove_finished(self, row: int) -> None:
        # the handle was already ended by _emit: keep its KV, free the row
        self._keep_row(row)
        self.cache.remove_row(row)
        self._active[row] = self._active[-1]
        self._active.pop()
        if not self._active:
            self.cache.release()
