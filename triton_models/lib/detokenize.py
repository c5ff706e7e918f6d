"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character.

Decoding each token alone breaks multi-byte characters and word-joining spaces (byte-level BPE,
sentencepiece); decoding the whole sequence each step and emitting the new suffix does not.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def drop_incomplete_tail(text: str) -> str:
    """`text` without the replacement characters that end it: decoding token ids cut inside a UTF-8
    character (max_tokens reached mid-character) writes U+FFFD for the bytes that never completed.
    Replacement characters inside the text are the model's own and stay."""
    return text.rstrip(REPLACEMENT)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            if stop in text:
                text, self.stopped = text.split(stop)[0], True
        return text

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text that became final (may be empty)."""
        self.ids.extend(new_ids)
        text = self.text()
        if text.endswith(REPLACEMENT) and not self.stopped:
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        # Hold back a tail that may still grow into a stop string.
        hold = (
            0
            if self.stopped
            else max((k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        )
        ready = text[: len(text) - hold]
        delta = ready[len(self.emitted) :] if ready.startswith(self.emitted) else ""
        self.emitted += delta
        return delta

    def finish(self) -> str:
        """The rest of the text once generation ended (a character it cut short is dropped)."""
        text = drop_incomplete_tail(self.text())
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta
