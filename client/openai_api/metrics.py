"""Prometheus metrics of the OpenAI front door (one registry per app, so tests can make several)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# TTFT and latency on CPU range from milliseconds (tiny models) to minutes (long answers).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mgm_openai_requests", "Chat completion requests, by model and HTTP status", ["model", "status"], registry=r
        )
        self.errors = Counter(
            "mgm_openai_errors",
            "Requests answered with an error, by HTTP status and code",
            ["status", "code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mgm_openai_prompt_tokens", "Prompt tokens (image tokens included)", ["model"], registry=r
        )
        self.completion_tokens = Counter("mgm_openai_completion_tokens", "Generated tokens", ["model"], registry=r)
        self.ttft = Histogram(
            "mgm_openai_time_to_first_token_seconds",
            "Request arrival to first answer text",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "mgm_openai_request_latency_seconds",
            "Request arrival to the end of the answer",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def error(self, model: str, status: int, code: str | None) -> None:
        self.requests.labels(model, str(status)).inc()
        self.errors.labels(str(status), code or "").inc()

    def done(
        self, model: str, prompt_tokens: int, completion_tokens: int, ttft_s: float | None, latency_s: float
    ) -> None:
        self.requests.labels(model, "200").inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        self.latency.labels(model).observe(latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
