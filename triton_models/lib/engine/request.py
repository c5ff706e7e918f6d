"""The engine's request types: what a caller submits, its validation, and the handle it gets back.

`GenerationRequest` is what callers build (lists, numpy arrays and torch tensors accepted);
`validate` turns it into a `ValidRequest` (tensors, a sampling spec with its own generator) or raises
ValueError with a message that says what to fix. The engine only ever works on `ValidRequest`s.
"""

from __future__ import annotations

import logging
import operator
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from triton_models.lib.sampling import RowSampling

log = logging.getLogger(__name__)

__all__ = [
    "GenerationRequest",
    "ValidRequest",
    "EngineLimits",
    "validate",
    "RequestHandle",
    "EngineShutdown",
    "TokenCallback",
]


class EngineShutdown(RuntimeError):
    """The engine stopped before the request finished (or a request was submitted after shutdown)."""


@dataclass
class GenerationRequest:
    """One generation request. `input_ids` may contain fake ids >= vocab_size (rows of `prompt_table`)."""

    input_ids: list[int]
    prompt_table: torch.Tensor | None = None  # (P, hidden) float; fake id vocab_size + k -> row k
    max_new_tokens: int = 512
    temperature: float = 0.0  # <= 0.001: greedy
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    seed: int | None = None  # per-request generator: results independent of batch mates
    stop_ids: list[int] = field(default_factory=list)  # generation ends when one is produced (not returned)
    request_id: str = ""
    # TensorRT-LLM's prompt_table_extra_ids: one uint64 per input id, 0 for text, the image's key for
    # its rows; KV of prompt-table rows is reused only where these agree (None: never past a fake id)
    extra_ids: list[int] | None = None


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against: the model's vocabulary, hidden size and positions."""

    vocab_size: int
    hidden_size: int
    max_positions: int


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed `validate`: the engine's only input."""

    ids: torch.Tensor  # (L,) long; ids >= vocab_size select rows of `table`
    table: torch.Tensor | None  # (P, hidden) float
    sampling: RowSampling
    stop_ids: frozenset
    max_new_tokens: int
    request_id: str = ""
    extra_ids: np.ndarray | None = None  # (L,) uint64, or None


_END = object()


TokenCallback = Callable[["RequestHandle", int | None, bool], None]


class RequestHandle:
    """Iterate to receive new token ids as they are produced; ends after the last token.

    An error inside the engine for this request is raised from the iteration (and from `result()` /
    `poll()`). `cancel()` stops the request at the engine's next step and frees its slot (the iteration
    then ends normally, with `finish_reason == "cancelled"`). Use one way of consuming per handle:
    iteration, `poll()` or `result()` (they share one queue); `tokens` always holds everything produced.
    """

    def __init__(
        self,
        request: GenerationRequest,
        valid: ValidRequest,
        wake: threading.Condition,
        callback: TokenCallback | None = None,
    ):
        self.request = request
        self.valid = valid
        self.request_id = valid.request_id
        self.tokens: list[int] = []  # every token produced so far (engine side)
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


def validate(r: GenerationRequest, limits: EngineLimits) -> ValidRequest:
    """Check every field of `r` against the model; ValueError says what is wrong."""
    if not isinstance(r, GenerationRequest):
        raise ValueError(f"expected a GenerationRequest, got {type(r).__name__}")
    raw = r.input_ids
    try:  # a list of ints; a 1-D integer tensor or numpy array is accepted too
        ids = (
            raw.detach().cpu()
            if isinstance(raw, torch.Tensor)
            else torch.as_tensor(list(raw) if not hasattr(raw, "__array__") else raw)
        )
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError("input_ids must be a list of integers") from None
    if ids.numel() == 0:
        raise ValueError("input_ids is empty")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim > 1:
        raise ValueError(f"input_ids must be a flat list of integers, got {ids.dtype} with shape {tuple(ids.shape)}")
    ids = ids.reshape(-1).to(torch.long)
    lowest, highest = int(ids.min()), int(ids.max())
    if lowest < 0:
        raise ValueError(
            f"input_ids contains a negative id ({lowest}); an <image> placeholder (-200) must be "
            f"replaced by fake ids vocab_size + k ({limits.vocab_size} + k) selecting prompt_table rows"
        )
    table = r.prompt_table
    if table is not None and not isinstance(table, torch.Tensor) and hasattr(table, "__array__"):
        table = torch.as_tensor(table)  # numpy array (e.g. straight from a Triton input)
    if table is not None:
        if not isinstance(table, torch.Tensor):
            raise ValueError(f"prompt_table must be a torch.Tensor, got {type(table).__name__}")
        if table.ndim != 2 or table.shape[1] != limits.hidden_size:
            raise ValueError(f"prompt_table must be (rows, {limits.hidden_size}), got {tuple(table.shape)}")
        if not table.is_floating_point():
            raise ValueError(f"prompt_table must be a float tensor, got {table.dtype}")
    if highest >= limits.vocab_size:
        rows = 0 if table is None else table.shape[0]
        if table is None:
            raise ValueError(
                f"input_ids contains fake id {highest} (>= vocab_size {limits.vocab_size}) "
                "but no prompt_table was given"
            )
        if highest - limits.vocab_size >= rows:
            raise ValueError(
                f"fake id {highest} selects prompt_table row {highest - limits.vocab_size} but the "
                f"table has {rows} rows (ids must be < {limits.vocab_size + rows})"
            )
    max_new = _integer(r.max_new_tokens, "max_new_tokens", minimum=1)
    if ids.numel() + max_new > limits.max_positions:
        raise ValueError(
            f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new}) exceeds the "
            f"model's {limits.max_positions} positions"
        )
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
    extra_ids = _extra_ids(r.extra_ids, ids.numel())
    sampling = RowSampling(temperature=temperature, top_p=top_p, top_k=top_k)
    if not sampling.greedy:  # a generator of its own: no global RNG is read or reseeded
        sampling.generator = torch.Generator()
        if seed is None:
            sampling.generator.seed()  # fresh entropy
        else:
            sampling.generator.manual_seed(seed % (2**64))
    return ValidRequest(
        ids=ids,
        table=table,
        sampling=sampling,
        stop_ids=stops,
        max_new_tokens=max_new,
        request_id=str(r.request_id),
        extra_ids=extra_ids,
    )


def _extra_ids(raw, length: int) -> np.ndarray | None:
    """uint64 extra ids, one per input id (None stays None)."""
    if raw is None:
        return None
    bad = ValueError("extra_ids must be a list of integers in [0, 2**64)")
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, np.ndarray):
        arr = raw.reshape(-1)
        if arr.size and (arr.dtype.kind not in "iu" or (arr.dtype.kind == "i" and arr.min() < 0)):
            raise bad
    else:  # Python ints one by one: numpy turns a list mixing 0 and 2**63 into floats
        values = []
        for x in raw:
            if isinstance(x, bool) or not isinstance(x, int | np.integer) or not 0 <= int(x) < 2**64:
                raise bad
            values.append(int(x))
        arr = np.array(values, dtype=np.uint64)
    if arr.size != length:
        raise ValueError(f"extra_ids has {arr.size} values but input_ids has {length}: give one per input id")
    return arr.astype(np.uint64)
