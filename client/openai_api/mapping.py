"""An OpenAI chat request -> the MGM request the Triton BLS takes (prompt, history, images, sampling).

As the original MGM chat: the images go with the first user turn (at its `<image>` tags, else in
front of its text), the earlier turns become `history`, and a system message replaces the chat
template's system prompt. Everything a user can get wrong is refused here or by the server's own
validation with a 400, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from client.mgm_client import RequestSpec
from client.openai_api.errors import bad_request
from client.openai_api.media import MediaPolicy, load_image
from client.openai_api.schema import ChatCompletionRequest, Message

MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass
class MGMRequest:
    spec: RequestSpec
    system: str | None = None
    stops: list[str] = field(default_factory=list)

    def tensors(self) -> dict[str, np.ndarray]:
        out = self.spec.tensors()
        out["stream"] = np.array([True])  # always streamed inside: TTFT, stop strings, cancellation
        if self.system is not None:
            out["system_prompt"] = np.array([self.system.encode()], dtype=np.object_)
        return out


def _text_of(message: Message, index: int, allow_images: bool) -> tuple[str, list[str]]:
    """(text, image URLs) of one message; text parts are joined by newlines."""
    param = f"messages[{index}].content"
    if message.content is None:
        raise bad_request(f"{param} is missing", param)
    if isinstance(message.content, str):
        return message.content, []
    texts, urls = [], []
    for k, part in enumerate(message.content):
        if part.type == "text":
            texts.append(part.text)
        elif not allow_images:
            raise bad_request(
                f"{param}[{k}]: images are only accepted in the first user message "
                "(MGM sees the images of a conversation in its first turn)",
                f"{param}[{k}]",
            )
        else:
            urls.append(part.image_url.url)
    return "\n".join(texts), urls


def _sampling(req: ChatCompletionRequest, default_max_tokens: int) -> dict:
    if req.n not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    if req.logprobs:
        raise bad_request("logprobs are not supported", "logprobs")
    if req.tools:
        raise bad_request("tools are not supported", "tools")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported", name)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise bad_request(f"{param} must be at least 1, got {max_tokens}", param)
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise bad_request(f"temperature must be between 0 and 2, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise bad_request(f"top_k must be >= 0 (0: no limit), got {req.top_k}", "top_k")
    if req.seed is not None and not 0 <= req.seed < 2**64:
        raise bad_request(f"seed must be in [0, 2**64), got {req.seed}", "seed")
    return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed)


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("stop sequences must not be empty", "stop")
    return stops


async def to_mgm(
    req: ChatCompletionRequest, media: MediaPolicy, max_images: int, default_max_tokens: int
) -> MGMRequest:
    sampling = _sampling(req, default_max_tokens)
    system_parts, turns = [], []
    for i, m in enumerate(req.messages):
        if m.role in ("system", "developer"):
            if turns:
                raise bad_request(
                    f"messages[{i}]: system messages must come before the conversation", f"messages[{i}].role"
                )
            system_parts.append(_text_of(m, i, allow_images=False)[0])
        else:
            turns.append((i, m))
    if not turns or turns[-1][1].role != "user":
        raise bad_request("the last message must be from the user", "messages")
    for k, (i, m) in enumerate(turns):
        expected = "a user" if k % 2 == 0 else "an assistant"
        if m.role != expected.split()[1]:
            raise bad_request(
                f"messages[{i}]: expected {expected} message (user and assistant turns "
                "alternate, starting with the user)",
                f"messages[{i}].role",
            )
    texts, urls = [], []
    for k, (i, m) in enumerate(turns):
        text, found = _text_of(m, i, allow_images=(k == 0))
        texts.append(text)
        urls.extend((f"messages[{i}].content", u) for u in found)
    if len(urls) > max_images:
        raise bad_request(f"{len(urls)} images given; this server takes at most {max_images} per request", "messages")
    images = [await load_image(url, media, param) for param, url in urls]
    history = [(texts[k], texts[k + 1]) for k in range(0, len(texts) - 1, 2)]
    spec = RequestSpec(prompt=texts[-1], images=images, history=history or None, **sampling)
    return MGMRequest(spec, "\n".join(system_parts) if system_parts else None, _stops(req.stop))


class StopMatcher:
    """Cuts streamed text at the first stop sequence, holding back what could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that is safe to send."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[: min(hits)], "", True
            return out
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
