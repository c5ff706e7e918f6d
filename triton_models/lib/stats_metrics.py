"""A component's running stats (hit/miss counts, bytes held) as Triton custom metrics.

`spec` maps a metric name to (kind, description, stats field); counters advance by the increase of
their field since the last update, gauges take its value. The families are kept for the life of the
object: the python backend refuses a metric whose family has been collected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from triton_models.lib.triton_io import pb


class StatsMetrics:
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
        self.reported = dict.fromkeys(self.metrics, 0)

    def update(self, stats: Mapping[str, int | float]) -> None:
        for field, (kind, metric) in self.metrics.items():
            value = stats.get(field, 0)
            if kind == "GAUGE":
                metric.set(value)
            elif value > self.reported[field]:
                metric.increment(value - self.reported[field])
            self.reported[field] = max(self.reported[field], value)
