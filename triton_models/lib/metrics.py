"""Custom metrics of the models on Triton's metrics endpoint (:8002): failure and cancellation counters
of the decoupled models, and the caches' stats (`StatsMetrics`).

Triton's own `nv_inference_request_failure` does not see a decoupled model's errors (they travel in
responses the model sends itself) nor its cancellations, so the models count them here. Every model
registers the same two families with the same description; the metrics registry merges families of
one name, so each model only adds its own `model` label:

    mgm_request_failures_total{model="mgm_bls", reason="invalid_input" | "internal"}
    mgm_request_cancellations_total{model="mgm_bls"}

Each model drops its families in `finalize` (`close()`): a family still alive when the stub itself
is torn down is cleared through shared memory that is already gone, and the stub segfaults on exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mgm_ref.errors import MGMError
from triton_models.lib.triton_io import pb

FAILURES = "mgm_request_failures_total"
CANCELLATIONS = "mgm_request_cancellations_total"
FAILURES_HELP = "Requests that ended with an error, by model and reason (invalid_input: the caller's to fix)"
CANCELLATIONS_HELP = "Requests whose client cancelled them or went away before the end, by model"


def failure_reason(exc: BaseException) -> str:
    """invalid_input for errors the caller can fix (MGMError; ValueError from input validation), else internal."""
    return "invalid_input" if isinstance(exc, (MGMError, ValueError)) else "internal"


class RequestMetrics:
    """The two counters of one model; a label set's Metric is made once and kept (it is the handle)."""

    def __init__(self, model: str):
        pb_utils = pb()
        kind = pb_utils.MetricFamily.COUNTER
        self.model = model
        self.failures = pb_utils.MetricFamily(name=FAILURES, description=FAILURES_HELP, kind=kind)
        self.cancellations = pb_utils.MetricFamily(name=CANCELLATIONS, description=CANCELLATIONS_HELP, kind=kind)
        self._failed: dict[str, Any] = {}  # reason -> pb_utils Metric
        self._cancelled = self.cancellations.Metric(labels={"model": model})

    def failed(self, exc: BaseException) -> None:
        if self.failures is None:  # closed: the model is being unloaded
            return
        reason = failure_reason(exc)
        if reason not in self._failed:
            self._failed[reason] = self.failures.Metric(labels={"model": self.model, "reason": reason})
        self._failed[reason].increment(1)

    def cancelled(self) -> None:
        if self._cancelled is not None:
            self._cancelled.increment(1)

    def close(self) -> None:
        """Release the metrics, then their families (a family must outlive its metrics)."""
        self._failed.clear()
        self._cancelled = None
        self.failures = self.cancellations = None


class StatsMetrics:
    """A component's running stats (hit/miss counts, bytes held) as custom metrics.

    `spec` maps a metric name to (kind, description, stats field); counters advance by the increase of
    their field since the last update, gauges take its value. The families are kept for the life of the
    object: the python backend refuses a metric whose family has been collected.
    """

    def __init__(self, spec: Mapping[str, tuple[str, str, str]], labels: dict[str, str]):
        pb_utils = pb()
        self.families: list[Any] = []
        self.metrics: dict[str, tuple[str, Any]] = {}
        for name, (kind, description, field) in spec.items():
            family = pb_utils.MetricFamily(
                name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind)
            )
            self.families.append(family)
            self.metrics[field] = (kind, family.Metric(labels=labels))
        self.reported: dict[str, float] = dict.fromkeys(self.metrics, 0.0)

    def update(self, stats: Mapping[str, int | float]) -> None:
        for field, (kind, metric) in self.metrics.items():
            value = stats.get(field, 0)
            if kind == "GAUGE":
                metric.set(value)
            elif value > self.reported[field]:
                metric.increment(value - self.reported[field])
            self.reported[field] = max(self.reported[field], value)

    def close(self) -> None:
        """Release the metrics, then their families; later updates are no-ops."""
        self.metrics.clear()
        self.families.clear()
