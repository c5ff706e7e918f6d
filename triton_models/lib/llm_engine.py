"""A Triton-free CPU LLM engine with in-flight batching: the CPU stand-in for TensorRT-LLM's batcher.

One engine thread owns the HF causal LM (LlamaForCausalLM, GemmaForCausalLM, MixtralForCausalLM as
built by `mgm_ref.loader.load_llm`). Each loop turn it

1. drops cancelled requests (their slot is free at once),
2. admits queued requests into free slots (at most `max_batch_size` run or prefill at a time) and
   prefills them one by one, each alone in its own cache (prompt embedded, fake ids spliced from its
   prompt table): whole prompts by default, or at most `prefill_chunk` prompt tokens per turn (chunked
   prefill, so that the running streams keep decoding during a long prompt). A finished prefill samples
   the request's first token and merges its KV cache into the running batch,
3. runs ONE batched decode forward for every running request, samples all next tokens in one call,
   streams them to the handles, and removes the finished rows.

Prompts follow TensorRT-LLM's prompt-table convention: an id >= vocab_size is a fake id that takes row
(id - vocab_size) of the request's `prompt_table` (P, H); MGM image features go there, ids
vocab_size .. vocab_size + 575 for one 576-token image. The model is called with `inputs_embeds`, so
Gemma's sqrt(hidden) scaling happens inside the HF model, image rows included, as in mgm_ref.

KV cache layout: one pre-allocated buffer per layer, (rows, kv_heads, capacity, head_dim), used through
a `transformers` Cache subclass. The running batch occupies rows [0, B) and columns [0, L); a row that
is shorter than L is left-padded (`pads[row]` masked columns) and gets explicit position ids, so every
row computes exactly what it would compute alone. A decode step writes one column in place (no
re-concatenation of the cache); capacity grows geometrically. Columns are only moved when a request
joins with a prompt longer than L (the others shift right), when a row leaves (the last row moves into
its slot) or when every remaining row carries a lot of left padding (all shift left).

On CPU, a model with grouped K/V heads runs on the "sdpa_native_gqa" attention backend while the
engine lives (see triton_models.lib.attention; `native_gqa=False` opts out).

API (thread-safe; handles are consumed by one thread each):
    engine = LLMEngine(llm, max_batch_size=8, device="cpu")
    handle = engine.submit(GenerationRequest(input_ids, prompt_table, max_new_tokens=..., ...),
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
import operator
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from mgm_runtime.prompt_table import embed_with_prompt_table
from triton_models.lib import attention
from triton_models.lib.sampling import RowSampling, sample_next

log = logging.getLogger(__name__)

__all__ = ["GenerationRequest", "RequestHandle", "LLMEngine", "EngineShutdown", "BatchKVCache"]


class EngineShutdown(RuntimeError):
    """The engine stopped before the request finished (or a request was submitted after shutdown)."""


@dataclass
class GenerationRequest:
    """One generation request. `input_ids` may contain fake ids >= vocab_size (rows of `prompt_table`)."""
    input_ids: list[int]
    prompt_table: torch.Tensor | None = None   # (P, hidden) float; fake id vocab_size + k -> row k
    max_new_tokens: int = 512
    temperature: float = 0.0                   # <= 0.001: greedy
    top_p: float = 1.0                         # 1.0: off
    top_k: int = 0                             # 0: off
    seed: int | None = None                    # per-request generator: results independent of batch mates
    stop_ids: list[int] = field(default_factory=list)  # generation ends when one is produced (not returned)
    request_id: str = ""


_END = object()


TokenCallback = Callable[["RequestHandle", Optional[int], bool], None]


class RequestHandle:
    """Iterate to receive new token ids as they are produced; ends after the last token.

    An error inside the engine for this request is raised from the iteration (and from `result()` /
    `poll()`). `cancel()` stops the request at the engine's next step and frees its slot (the iteration
    then ends normally, with `finish_reason == "cancelled"`). Use one way of consuming per handle:
    iteration, `poll()` or `result()` (they share one queue); `tokens` always holds everything produced.
    """

    def __init__(self, request: GenerationRequest, wake: threading.Condition,
                 callback: TokenCallback | None = None):
        self.request = request
        self.request_id = request.request_id
        self.tokens: list[int] = []            # every token produced so far (engine side)
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "shutdown"
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._exhausted = False
        self._wake = wake
        self._callback = callback

    # ---- consumer side ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self._exhausted:
            if self.error is not None:
                raise self.error
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._exhausted = True
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item

    def poll(self) -> tuple[list[int], bool]:
        """Non-blocking: (tokens that arrived since the last poll / iteration, finished?)."""
        out = []
        while not self._exhausted:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self._exhausted = True
            else:
                out.append(item)
        if self._exhausted and self.error is not None:
            raise self.error
        return out, self._exhausted

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait for the end and return all tokens (raises the request's error, TimeoutError on timeout)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    def cancel(self) -> None:
        self._cancel.set()
        with self._wake:
            self._wake.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # ---- engine side -----------------------------------------------------------------------------
    def _push(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        self._queue.put(token)
        self._notify(token, False)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()
        self._done.set()
        self._queue.put(_END)
        self._notify(None, True)

    def _notify(self, token: int | None, final: bool) -> None:
        if self._callback is None:
            return
        try:
            self._callback(self, token, final)
        except Exception:  # never let a consumer's callback break the engine thread
            log.exception("token callback of request %r failed", self.request_id)


def _integer(value, name: str, minimum: int | None = None) -> int:
    """An int (numpy integers too; not bool, not float) at least `minimum`, else ValueError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


# ---- batched KV cache ----------------------------------------------------------------------------
class _SlotLayer(DynamicLayer):
    """One decoder layer's slice of BatchKVCache: writes new columns in place, returns views."""

    def __init__(self, owner: "BatchKVCache"):
        super().__init__()
        self._owner = owner
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None

    def update(self, key_states, value_states, cache_kwargs=None):
        o = self._owner
        rows, start = o.batch, o.length
        end = start + key_states.shape[-2]
        self.kbuf[:rows, :, start:end] = key_states
        self.vbuf[:rows, :, start:end] = value_states
        self.keys, self.values = self.kbuf[:rows, :, :end], self.vbuf[:rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self._owner.length + cache_position.shape[0], 0


class BatchKVCache(Cache):
    """Left-padded batched KV cache over pre-allocated buffers (see the module docstring)."""

    def __init__(self, num_layers: int, max_rows: int, column_chunk: int = 128):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.max_rows = max_rows
        self.column_chunk = column_chunk
        self.batch = 0            # rows in use
        self.length = 0           # columns in use
        self.pads: list[int] = []  # masked left columns per row
        self.rows_cap = 0
        self.cols_cap = 0
        self.moved_columns = 0    # columns copied by merges / shifts / compaction (for benchmarks)

    # -- capacity --
    def _ensure(self, rows: int, cols: int, like: torch.Tensor) -> None:
        if rows <= self.rows_cap and cols <= self.cols_cap:
            return
        new_rows = min(self.max_rows, max(rows, 2 * self.rows_cap, 1)) if rows > self.rows_cap else self.rows_cap
        new_rows = max(new_rows, rows)
        if cols > self.cols_cap:
            grow = max(cols, self.cols_cap + self.cols_cap // 2)
            new_cols = -(-grow // self.column_chunk) * self.column_chunk
        else:
            new_cols = self.cols_cap
        _, heads, _, head_dim = like.shape
        b, n = self.batch, self.length
        shape = (new_rows, heads, new_cols, head_dim)
        # allocate everything first: an out-of-memory error leaves the cache as it was
        fresh = [(like.new_empty(shape), like.new_empty(shape)) for _ in self.layers]
        for layer, (kbuf, vbuf) in zip(self.layers, fresh):
            if layer.kbuf is not None and b and n:
                kbuf[:b, :, :n] = layer.kbuf[:b, :, :n]
                vbuf[:b, :, :n] = layer.vbuf[:b, :, :n]
            layer.kbuf, layer.vbuf = kbuf, vbuf
            layer.is_initialized = True
        self.rows_cap, self.cols_cap = new_rows, new_cols

    def reserve_step(self) -> None:
        """Make room for one more column (a decode step)."""
        if self.length + 1 > self.cols_cap:
            self._ensure(self.batch, self.length + 1, self.layers[0].kbuf)

    def release(self) -> None:
        for layer in self.layers:
            layer.kbuf = layer.vbuf = layer.keys = layer.values = None
            layer.is_initialized = False
        self.batch = self.length = self.rows_cap = self.cols_cap = 0
        self.pads = []

    # -- membership --
    def add_row(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Append one request's prefilled cache ((1, heads, n, head_dim) per layer); returns its row."""
        n = kv[0][0].shape[-2]
        b, length = self.batch, self.length
        if b == 0:
            length = 0
        new_len = max(length, n)
        self._ensure(b + 1, new_len + 1, kv[0][0])
        if b and n > length:  # the newcomer is longer: shift the running rows right
            s = n - length
            for layer in self.layers:
                for buf in (layer.kbuf, layer.vbuf):
                    buf[:b, :, s:s + length] = buf[:b, :, :length].clone()
                    buf[:b, :, :s] = 0
            self.pads = [p + s for p in self.pads]
            self.moved_columns += b * length
        pad = new_len - n
        for layer, (k, v) in zip(self.layers, kv):
            layer.kbuf[b, :, pad:new_len] = k[0]
            layer.vbuf[b, :, pad:new_len] = v[0]
            if pad:
                layer.kbuf[b, :, :pad] = 0
                layer.vbuf[b, :, :pad] = 0
        self.pads.append(pad)
        self.batch, self.length = b + 1, new_len
        return b

    def remove_row(self, row: int) -> None:
        """Drop a row; the last row moves into its slot (callers mirror that move)."""
        last = self.batch - 1
        if row != last:
            for layer in self.layers:
                layer.kbuf[row, :, :self.length] = layer.kbuf[last, :, :self.length]
                layer.vbuf[row, :, :self.length] = layer.vbuf[last, :, :self.length]
            self.pads[row] = self.pads[last]
            self.moved_columns += self.length
        self.pads.pop()
        self.batch = last
        if self.batch == 0:
            self.length = 0

    def trim(self) -> None:
        """Drop left columns that every row masks, when that saves enough attention work."""
        if not self.batch:
            return
        p = min(self.pads)
        if p == 0 or (p * 8 < self.length and p < 64):
            return
        b, n = self.batch, self.length
        for layer in self.layers:
            for buf in (layer.kbuf, layer.vbuf):
                buf[:b, :, :n - p] = buf[:b, :, p:n].clone()
        self.pads = [x - p for x in self.pads]
        self.length = n - p
        self.moved_columns += b * (n - p)


# ---- the engine ----------------------------------------------------------------------------------
@dataclass
class _Active:
    handle: RequestHandle
    sampling: RowSampling
    stops: frozenset
    max_new_tokens: int
    produced: int = 0
    last_token: int = -1


@dataclass
class _Prefill:
    state: _Active
    embeds: torch.Tensor          # (1, n, hidden) spliced prompt
    cache: DynamicCache           # this request's own cache until it joins the batch
    done: int = 0                 # prompt tokens prefilled so far


class LLMEngine:
    """In-flight batching generation over an HF causal LM, driven by one engine thread."""

    def __init__(self, llm, max_batch_size: int = 8, device: str | torch.device = "cpu",
                 num_threads: int | None = None, prefill_chunk: int | None = None,
                 native_gqa: bool = True):
        """`num_threads`: torch.set_num_threads in the engine thread (process-wide; None leaves it).
        `prefill_chunk`: at most this many prompt tokens are prefilled between two decode steps (chunked
        prefill: running streams keep flowing while a long prompt is prefilled, at some cost in TTFT).
        None: newcomers are prefilled whole before the next decode step (bit-exact with a solo run).
        `native_gqa`: on CPU, switch an "sdpa" model with grouped K/V heads to the equivalent
        "sdpa_native_gqa" backend (triton_models.lib.attention) while the engine runs; it avoids copying
        the KV cache per layer and step under a padding mask. The original backend is restored by shutdown().
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
            raise ValueError(f"input embeddings have {self.embed.num_embeddings} rows but vocab_size is {self.vocab_size}")
        self.hidden_size = int(self.embed.embedding_dim)
        self.max_positions = int(cfg.max_position_embeddings)
        self.dtype = self.embed.weight.dtype
        window = getattr(cfg, "sliding_window", None)
        self.sliding_window = window if window and getattr(cfg, "use_sliding_window", True) else None
        self._restore_attn = None
        if native_gqa and attention.wants_native_gqa(llm, self.device):
            self._restore_attn = cfg._attn_implementation
            llm.set_attn_implementation(attention.register())
        self.attn_impl = getattr(cfg, "_attn_implementation", "sdpa") or "sdpa"
        self.cache = BatchKVCache(int(cfg.num_hidden_layers), max_batch_size)

        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._active: list[_Active] = []
        self._prefilling: list[_Prefill] = []   # admitted (slot reserved), prompt not fully prefilled yet
        self._stop = False
        self.stats: dict[str, int] = dict(steps=0, batched_steps=0, max_batch_seen=0, tokens_generated=0,
                                          prefills=0, prefill_tokens=0, completed=0, cancelled=0, failed=0)
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, callback: TokenCallback | None = None) -> RequestHandle:
        """Validate and queue `request`; returns a handle that streams its tokens. ValueError on bad input.

        `callback(handle, token, final)`, if given, is called from the engine thread for every new token
        (final=False) and once at the end (token=None, final=True; see handle.finish_reason / .error):
        e.g. to send streaming responses without a consumer thread. It must be quick and not block.
        """
        ids, table, sampling = self._validate(request)
        handle = RequestHandle(request, self._cond, callback)
        handle._ids, handle._table, handle._sampling = ids, table, sampling
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
        if self._restore_attn is not None and not self._thread.is_alive():
            if self.llm.config._attn_implementation == attention.NAME:
                self.llm.set_attn_implementation(self._restore_attn)
            self._restore_attn = None

    def __enter__(self) -> "LLMEngine":
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
        return dict(self.stats, active=len(self._active), pending=len(self._pending), prefilling=len(self._prefilling),
                    cache_length=self.cache.length, moved_columns=self.cache.moved_columns)

    # ---- validation ------------------------------------------------------------------------------
    def _validate(self, r: GenerationRequest):
        if not isinstance(r, GenerationRequest):
            raise ValueError(f"expected a GenerationRequest, got {type(r).__name__}")
        raw = r.input_ids
        try:  # a list of ints; a 1-D integer tensor or numpy array is accepted too
            ids = raw.detach().cpu() if isinstance(raw, torch.Tensor) else torch.as_tensor(
                list(raw) if not hasattr(raw, "__array__") else raw)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError("input_ids must be a list of integers") from None
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim > 1:
            raise ValueError(f"input_ids must be a flat list of integers, got {ids.dtype} with shape {tuple(ids.shape)}")
        ids = ids.reshape(-1).to(torch.long)
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0:
            raise ValueError(f"input_ids contains a negative id ({lowest}); an <image> placeholder (-200) must be "
                             f"replaced by fake ids vocab_size + k ({self.vocab_size} + k) selecting prompt_table rows")
        table = r.prompt_table
        if table is not None and not isinstance(table, torch.Tensor) and hasattr(table, "__array__"):
            table = torch.as_tensor(table)  # numpy array (e.g. straight from a Triton input)
        if table is not None:
            if not isinstance(table, torch.Tensor):
                raise ValueError(f"prompt_table must be a torch.Tensor, got {type(table).__name__}")
            if table.ndim != 2 or table.shape[1] != self.hidden_size:
                raise ValueError(f"prompt_table must be (rows, {self.hidden_size}), got {tuple(table.shape)}")
            if not table.is_floating_point():
                raise ValueError(f"prompt_table must be a float tensor, got {table.dtype}")
        if highest >= self.vocab_size:
            rows = 0 if table is None else table.shape[0]
            if table is None:
                raise ValueError(f"input_ids contains fake id {highest} (>= vocab_size {self.vocab_size}) "
                                 "but no prompt_table was given")
            if highest - self.vocab_size >= rows:
                raise ValueError(f"fake id {highest} selects prompt_table row {highest - self.vocab_size} but the "
                                 f"table has {rows} rows (ids must be < {self.vocab_size + rows})")
        max_new = _integer(r.max_new_tokens, "max_new_tokens", minimum=1)
        if ids.numel() + max_new > self.max_positions:
            raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new}) exceeds the "
                             f"model's {self.max_positions} positions")
        try:
            temperature, top_p = float(r.temperature), float(r.top_p)
        except (TypeError, ValueError):
            raise ValueError("temperature and top_p must be numbers") from None
        if not temperature >= 0 or temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {r.temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {r.top_p!r}")
        top_k = _integer(r.top_k, "top_k", minimum=0)
        seed = None if r.seed is None else _integer(r.seed, "seed")
        try:
            stops = frozenset(int(s) for s in r.stop_ids)
        except (TypeError, ValueError):
            raise ValueError("stop_ids must be a list of integers") from None
        sampling = RowSampling(temperature=temperature, top_p=top_p, top_k=top_k)
        if not sampling.greedy:
            seed = seed if seed is not None else random.getrandbits(63)
            sampling.generator = torch.Generator().manual_seed(seed % (2 ** 64))
        return ids, table, (sampling, stops, max_new)

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
        out = []
        while self._pending and len(out) < free:
            out.append(self._pending.popleft())
        # cancelled requests still waiting for a slot leave the queue now
        if any(h.cancelled for h in self._pending):
            kept = collections.deque()
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
    def _embed_prompt(self, handle: RequestHandle) -> torch.Tensor:
        return embed_with_prompt_table(handle._ids.to(self.device), self.embed, handle._table, self.vocab_size)

    def _start_prefill(self, handle: RequestHandle) -> None:
        if handle.cancelled:
            self._end(handle, "cancelled")
            return
        sampling, stops, max_new = handle._sampling
        state = _Active(handle, sampling, stops, max_new)
        try:
            embeds = self._embed_prompt(handle)[None]
        except Exception as e:
            log.info("request %r failed: %s", handle.request_id, e)
            self._end(handle, "error", e)
            return
        self._prefilling.append(_Prefill(state, embeds, DynamicCache()))

    def _prefill_work(self) -> None:
        """Prefill queued prompts, oldest first, within this turn's token budget (prefill_chunk)."""
        budget = self.prefill_chunk if self.prefill_chunk is not None else float("inf")
        while self._prefilling and budget > 0:
            p = self._prefilling[0]
            n = p.embeds.shape[1]
            take = int(min(n - p.done, budget))
            try:
                positions = torch.arange(p.done, p.done + take, device=self.device)
                out = self.llm(inputs_embeds=p.embeds[:, p.done:p.done + take], position_ids=positions[None],
                               past_key_values=p.cache, use_cache=True, cache_position=positions,
                               logits_to_keep=1)
                p.done += take
                budget -= take
                self.stats["prefill_tokens"] += take
                if p.done < n:
                    continue
                self._prefilling.pop(0)
                self.stats["prefills"] += 1
                token = int(sample_next(out.logits[:, -1], [p.state.sampling])[0])
                if self._emit(p.state, token):
                    self.cache.add_row([(layer.keys, layer.values) for layer in p.cache.layers])
                    self._active.append(p.state)
            except Exception as e:
                log.info("request %r failed in prefill: %s", p.state.handle.request_id, e)
                if self._prefilling and self._prefilling[0] is p:
                    self._prefilling.pop(0)
                self._end(p.state.handle, "error", e)

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
        embeds = self.embed(tokens)[:, None, :]
        positions = torch.tensor([length - p for p in cache.pads], device=self.device)[:, None]
        cache.reserve_step()
        out = self.llm(inputs_embeds=embeds, attention_mask=self._decode_mask(), position_ids=positions,
                       past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([length], device=self.device), logits_to_keep=1)
        cache.length = length + 1
        next_tokens = sample_next(out.logits[:, -1], [s.sampling for s in active]).tolist()
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], b)
        if b > 1:
            self.stats["batched_steps"] += 1
        finished = [row for row, (state, token) in enumerate(zip(active, next_tokens))
                    if not self._emit(state, token)]
        for row in reversed(finished):
            self._remove_finished(row)
        cache.trim()

    def _remove_finished(self, row: int) -> None:
        # the handle was already ended by _emit: only free the row
        self.cache.remove_row(row)
        self._active[row] = self._active[-1]
        self._active.pop()
        if not self._active:
            self.cache.release()
