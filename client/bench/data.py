"""mgm-bench's workload and measurements, with no server involved (unit-tested on their own).

- `make_workload()`: synthetic scenes of several sizes (PNG and JPEG) x several prompts;
- `perf_input_data()`: the perf_analyzer `--input-data` JSON for that workload (images as b64 UINT8);
- `stream_stats()`: TTFT, inter-token latency, output tokens and answers from a perf_analyzer
  `--profile-export-file` (per-response timestamps, ns);
- `summarize()`: mean and p50/p90/p99 of a list of numbers.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgm_ref.tiny import synthetic_scene

# (width, height, format): a small PNG, a VGA JPEG and an XGA JPEG
IMAGE_SIZES: tuple[tuple[int, int, str], ...] = ((320, 240, "PNG"), (640, 480, "JPEG"), (1024, 768, "JPEG"))
PROMPTS: tuple[str, ...] = (
    "What is shown in this image?",
    "Describe the scene in detail.",
    "How many objects can you see, and what colours are they?",
)
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    image: bytes  # an encoded PNG/JPEG file
    image_name: str  # e.g. "640x480.jpeg"

    @property
    def key(self) -> tuple[str, int]:
        """What identifies the item in a profile export (which stores every request's inputs)."""
        return self.prompt, len(self.image)


def synthetic_image(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """mgm_ref.tiny's synthetic scene encoded as `fmt`: PNG noise-free (small), JPEG with mild noise like a photo.

    Photo-like rather than random noise: random pixels make multi-megabyte PNGs, and perf_analyzer's
    profile export stores every request's inputs.
    """
    image = synthetic_scene(width, height, seed, noise=0 if fmt.upper() == "PNG" else 6)
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), **({"quality": 90} if fmt.upper() == "JPEG" else {}))
    return buf.getvalue()


def parse_image_sizes(text: str) -> tuple[tuple[int, int, str], ...]:
    """ "320x240:png,640x480:jpeg" -> ((320, 240, "PNG"), (640, 480, "JPEG")); the format defaults to JPEG."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        dims, _, fmt = part.partition(":")
        try:
            w, h = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise ValueError(f"image size {part!r}: expected WIDTHxHEIGHT[:png|jpeg]") from None
        fmt = (fmt or "jpeg").upper().replace("JPG", "JPEG")
        if fmt not in ("PNG", "JPEG") or w < 1 or h < 1:
            raise ValueError(f"image size {part!r}: expected WIDTHxHEIGHT[:png|jpeg]")
        sizes.append((w, h, fmt))
    if not sizes:
        raise ValueError("no image sizes given")
    return tuple(sizes)


def make_workload(
    sizes: Sequence[tuple[int, int, str]] = IMAGE_SIZES, prompts: Sequence[str] = PROMPTS, seed: int = 0
) -> list[WorkItem]:
    """Every prompt with every image, ordered so that consecutive requests change image size."""
    images = [(synthetic_image(w, h, fmt, seed + k), f"{w}x{h}.{fmt.lower()}") for k, (w, h, fmt) in enumerate(sizes)]
    return [WorkItem(p, blob, name) for p in prompts for blob, name in images]


def perf_input_data(
    items: Sequence[WorkItem], max_tokens: int, stream: bool | None = None, temperature: float = 0.0
) -> dict:
    """perf_analyzer --input-data: one step per item (sent in turn).

    UINT8 images go as {"b64": ..., "shape": [nbytes]} (shape without the batch dim); BYTES inputs
    as plain JSON strings (b64 would need a 4-byte length prefix). `stream` is the mgm_bls input
    (None: leave it out, as the ensemble has no such input).
    """
    steps = []
    for item in items:
        step = {
            "text_input": [item.prompt],
            "image_input": {"b64": base64.b64encode(item.image).decode("ascii"), "shape": [len(item.image)]},
            "max_tokens": [int(max_tokens)],
            "temperature": [float(temperature)],
        }
        if stream is not None:
            step["stream"] = [bool(stream)]
        steps.append(step)
    return {"data": steps}


def write_input_data(path: Path, items: Sequence[WorkItem], max_tokens: int, stream: bool | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(perf_input_data(items, max_tokens, stream)))
    return path


# ------------------------------------------------------------------------------------------------ stats
def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """{"mean", "p50", "p90", "p99"} (None for an empty list)."""
    if not len(values):
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


@dataclass
class RequestTiming:
    latency_ms: float  # request sent -> last response
    ttft_ms: float | None  # request sent -> first response with text
    output_tokens: int | None
    text: str = ""
    key: tuple[str, int] | None = None  # (prompt, image bytes), to match a WorkItem
    text_responses: int = 1  # responses that carried text

    @property
    def itl_ms(self) -> float | None:
        """Inter-token latency as genai-perf defines it: (latency - TTFT) / (output tokens - 1).

        None for an answer that came in one piece (not streamed): its tokens were never seen apart.
        """
        if self.ttft_ms is None or not self.output_tokens or self.output_tokens < 2 or self.text_responses < 2:
            return None
        return (self.latency_ms - self.ttft_ms) / (self.output_tokens - 1)


@dataclass
class StreamStats:
    requests: list[RequestTiming] = field(default_factory=list)
    responses_per_request: float = 0.0
    span_s: float = 0.0  # first request sent -> last response received

    @property
    def throughput(self) -> float | None:
        """Requests per second over the span (perf_analyzer's own number rounds a --request-count run's
        window to whole seconds)."""
        return len(self.requests) / self.span_s if self.span_s > 0 else None

    @property
    def latency_ms(self) -> dict:
        return summarize([r.latency_ms for r in self.requests])

    @property
    def ttft_ms(self) -> dict:
        return summarize([r.ttft_ms for r in self.requests if r.ttft_ms is not None])

    @property
    def itl_ms(self) -> dict:
        return summarize([r.itl_ms for r in self.requests if r.itl_ms is not None])

    @property
    def mean_output_tokens(self) -> float | None:
        counts = [r.output_tokens for r in self.requests if r.output_tokens is not None]
        return float(np.mean(counts)) if counts else None


def _text(outputs: dict) -> str:
    value = outputs.get("text_output", "")
    if isinstance(value, list):
        value = "".join(str(v) for v in value)
    return value if isinstance(value, str) else str(value)


def request_timing(request: dict, count_tokens: Callable[[str], int] | None = None) -> RequestTiming | None:
    """One profile-export request -> its timing; None when it got no response."""
    sent = request["timestamp"]
    stamps = request.get("response_timestamps") or []
    if not stamps:
        return None
    outputs = request.get("response_outputs") or [{} for _ in stamps]
    texts = [_text(o) for o in outputs]
    # The first response that carries text; an empty FINAL-only response is no token.
    first = next((t for t, text in zip(stamps, texts, strict=False) if text), None) if any(outputs) else stamps[0]
    text = "".join(texts)
    counts = [o["output_token_count"] for o in outputs if "output_token_count" in o]
    if counts:
        tokens = int(np.ravel(counts[-1])[0]) if isinstance(counts[-1], list) else int(counts[-1])
    elif count_tokens is not None and any(outputs):
        tokens = count_tokens(text)
    else:
        tokens = None
    inputs = request.get("request_inputs") or {}
    key = None
    if "text_input" in inputs and "image_input" in inputs:
        prompt = inputs["text_input"]
        key = (prompt[0] if isinstance(prompt, list) else prompt, len(inputs["image_input"]))
    return RequestTiming(
        latency_ms=(stamps[-1] - sent) / 1e6,
        ttft_ms=None if first is None else (first - sent) / 1e6,
        output_tokens=tokens,
        text=text,
        key=key,
        text_responses=sum(1 for t in texts if t) if any(outputs) else len(stamps),
    )


def stream_stats(
    export: dict | str | Path, concurrency: int | None = None, count_tokens: Callable[[str], int] | None = None
) -> StreamStats:
    """TTFT / ITL / tokens of every request of a perf_analyzer profile export (one experiment, or the
    one at `concurrency`). `count_tokens(text)` counts tokens for models that do not report them."""
    if not isinstance(export, dict):
        export = json.loads(Path(export).read_text())
    experiments = export.get("experiments", [])
    if concurrency is not None:
        experiments = [e for e in experiments if e.get("experiment", {}).get("value") == concurrency]
    stats = StreamStats()
    n_responses, first_sent, last_response = 0, None, None
    for experiment in experiments:
        for request in experiment.get("requests", []):
            timing = request_timing(request, count_tokens)
            if timing is not None:
                stats.requests.append(timing)
                n_responses += len(request["response_timestamps"])
                sent, done = request["timestamp"], request["response_timestamps"][-1]
                first_sent = sent if first_sent is None else min(first_sent, sent)
                last_response = done if last_response is None else max(last_response, done)
    stats.responses_per_request = n_responses / len(stats.requests) if stats.requests else 0.0
    stats.span_s = (last_response - first_sent) / 1e9 if stats.requests else 0.0
    return stats
