"""One answer of the streaming BLS, without Triton: preprocess -> vision -> generate -> detokenise.

`run_answer` drives the stages through hooks (`Stages`: the three model calls; `send`: deliver a
`Piece`; `cancelled`: has the client gone) and owns the text logic: incremental detokenising that
never splits a UTF-8 character, stop-string hold-back and cut, and an answer that starts without the
spaces the model puts before its first word. The Triton model only implements the hooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from triton_models.lib.detokenize import IncrementalDetokenizer


@dataclass(frozen=True)
class Piece:
    """What one response carries: new text (streaming) or the whole answer (final, not streaming)."""

    text: str
    tokens: int  # tokens generated so far
    ttft_ms: float  # time to the first token; 0.0 before it
    final: bool


class TokenStream(Protocol):
    async def next(self) -> list[int] | None:
        """The next token ids; None once the generation ended."""

    async def close(self) -> None:
        """Stop reading (and the generation, if it still runs): the answer is complete or its client left."""


class Stages(Protocol):
    async def preprocess(self) -> Any: ...

    async def encode(self, preprocessed: Any) -> Any: ...

    async def generate(self, preprocessed: Any, encoded: Any) -> TokenStream: ...


class AnswerText:
    """Token ids in, answer text out. Streaming: `push` returns the text that became final (the first
    non-empty piece left-stripped); not streaming: `push` returns "" and `finish` the stripped whole."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], stream: bool):
        self.detok = IncrementalDetokenizer(tokenizer, stop_strings)
        self.stream = stream
        self.sent_any = False

    @property
    def stopped(self) -> bool:
        return self.detok.stopped

    def push(self, ids: list[int]) -> str:
        delta = self.detok.push(ids)
        if not self.stream or not delta:
            return ""
        if not self.sent_any:
            delta = delta.lstrip()
        self.sent_any = self.sent_any or bool(delta)
        return delta

    def finish(self) -> str:
        rest = self.detok.finish()
        if not self.stream:
            return self.detok.emitted.strip()
        return rest if self.sent_any else rest.lstrip()


async def run_answer(
    stages: Stages,
    text: AnswerText,
    send: Callable[[Piece], None],
    cancelled: Callable[[], bool],
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Run one request to its final piece. Reading stops at a stop string or when the client left."""
    start = clock()
    pre = await stages.preprocess()
    encoded = await stages.encode(pre)
    tokens = await stages.generate(pre, encoded)
    ttft, count = 0.0, 0
    try:
        while not cancelled():
            ids = await tokens.next()
            if ids is None:
                break
            if ids and not count:
                ttft = (clock() - start) * 1000
            count += len(ids)
            delta = text.push(ids)
            if delta:
                send(Piece(delta, count, ttft, final=False))
            if text.stopped:
                break
    finally:
        await tokens.close()
    send(Piece(text.finish(), count, ttft, final=True))
