"""Every metric the services declare, and the name each gets in Prometheus.

Each service declares its instruments in one class (gateway/metrics.py, worker/metrics.py,
model_server/metrics.py, aggregator/metrics.py). `declared()` instantiates those classes with a
meter that only records what is created, and `prometheus_names()` runs the declarations through
the real OpenTelemetry Prometheus exporter, so the names are exactly the scraped ones (`_total`
and unit suffixes included). Tests compare docs/metrics.md, the Grafana dashboard and a real
scrape against this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SERVICES = ("gateway", "worker", "model_server", "aggregator")


@dataclass(frozen=True)
class Instrument:
    service: str
    kind: str  # counter, histogram, gauge, up_down_counter (OpenTelemetry instrument kinds)
    name: str  # the OpenTelemetry instrument name
    unit: str
    description: str


class _Noop:
    def add(self, *_args: Any, **_kw: Any) -> None:
        pass

    def record(self, *_args: Any, **_kw: Any) -> None:
        pass

    def set(self, *_args: Any, **_kw: Any) -> None:
        pass


class RecordingMeter:
    """A meter that remembers every instrument created on it (and records nothing)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.instruments: list[Instrument] = []

    def _add(self, kind: str, name: str, unit: str, description: str) -> _Noop:
        self.instruments.append(Instrument(self.service, kind, name, unit, description))
        return _Noop()

    def create_counter(self, name: str, unit: str = "", description: str = "") -> _Noop:
        return self._add("counter", name, unit, description)

    def create_up_down_counter(self, name: str, unit: str = "", description: str = "") -> _Noop:
        return self._add("up_down_counter", name, unit, description)

    def create_histogram(
        self, name: str, unit: str = "", description: str = "", **_kw: Any
    ) -> _Noop:
        return self._add("histogram", name, unit, description)

    def create_gauge(self, name: str, unit: str = "", description: str = "") -> _Noop:
        return self._add("gauge", name, unit, description)

    def create_observable_counter(
        self, name: str, callbacks: Any = None, unit: str = "", description: str = ""
    ) -> _Noop:
        return self._add("counter", name, unit, description)

    def create_observable_up_down_counter(
        self, name: str, callbacks: Any = None, unit: str = "", description: str = ""
    ) -> _Noop:
        return self._add("up_down_counter", name, unit, description)

    def create_observable_gauge(
        self, name: str, callbacks: Any = None, unit: str = "", description: str = ""
    ) -> _Noop:
        return self._add("gauge", name, unit, description)


def declared() -> list[Instrument]:
    from aggregator.metrics import AggregatorMetrics
    from gateway.metrics import GatewayMetrics
    from model_server.metrics import ServerMetrics
    from worker.metrics import WorkerMetrics

    meters = {s: RecordingMeter(s) for s in SERVICES}
    GatewayMetrics("catalog", lambda: 0, lambda: 0, meter=meters["gateway"])
    WorkerMetrics(lambda: 0, meter=meters["worker"])
    ServerMetrics(meters["model_server"])
    AggregatorMetrics(meters["aggregator"])
    return [i for m in meters.values() for i in m.instruments]


def prometheus_names(instruments: list[Instrument]) -> dict[Instrument, str]:
    """Instrument -> its metric name in Prometheus: what a PromQL query names (`x_total` for a
    counter, the base name of a histogram's `_bucket`/`_sum`/`_count`)."""
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    def exported(i: Instrument) -> str:
        # One registry per instrument: its one `# TYPE` line is the instrument's family.
        registry = CollectorRegistry()
        reader = PrometheusMetricReader(disable_target_info=True, registry=registry)
        provider = MeterProvider(metric_readers=[reader])
        meter = provider.get_meter("catalog")
        if i.kind == "counter":
            meter.create_counter(i.name, unit=i.unit).add(1)
        elif i.kind == "up_down_counter":
            meter.create_up_down_counter(i.name, unit=i.unit).add(1)
        elif i.kind == "histogram":
            meter.create_histogram(i.name, unit=i.unit).record(1)
        else:
            meter.create_observable_gauge(
                i.name, callbacks=[lambda _options: [metrics.Observation(1)]], unit=i.unit
            )
        text = generate_latest(registry).decode()
        provider.shutdown()
        (name,) = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
        return name

    return {i: exported(i) for i in instruments}
