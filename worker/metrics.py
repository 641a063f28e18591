"""OpenTelemetry instruments of the worker (exported to Prometheus by
llmstream.telemetry.setup_metrics; names get `_total` suffixes there).

Counters are added once per request at its end (not per token), so they cost nothing on the
hot path. Gauges read plain values the event loop keeps up to date: exporter callbacks run on
the HTTP server's thread and must not touch the Kafka client. Without `setup_metrics` the
OpenTelemetry API is a no-op. docs/metrics.md lists every series and interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics

# Broker acknowledgement of one event (acks=all, linger 2 ms): milliseconds on a healthy
# cluster, seconds when a broker is failing over.
PRODUCE_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class WorkerMetrics:
    def __init__(self, inflight: Callable[[], int], meter: Any | None = None) -> None:
        meter = meter if meter is not None else metrics.get_meter("llmstream.worker")
        self._inflight = inflight
        # (prompts topic, partition) -> records not committed yet; rebuilt by the worker.
        self.prompt_lag: dict[tuple[str, int], int] = {}
        self.requests = meter.create_counter(
            "llmstream_worker_requests",
            description="Requests ended by this worker, by outcome (finish reason or failure "
            "code; skipped_terminal = found finished in the log at takeover).",
        )
        self.tokens = meter.create_counter(
            "llmstream_worker_tokens", description="Tokens produced as token events."
        )
        self.token_events = meter.create_counter(
            "llmstream_worker_token_events",
            description="token_delta events produced (tokens / events = coalescing factor).",
        )
        self.model_deltas = meter.create_counter(
            "llmstream_worker_model_deltas", description="Deltas received from model servers."
        )
        self.retries = meter.create_counter(
            "llmstream_worker_retries",
            description="Attempts retried on another model server (UNAVAILABLE, ...).",
        )
        self.takeovers = meter.create_counter(
            "llmstream_worker_takeovers",
            description="Requests continued from tokens already in the log.",
        )
        self.dead_letters = meter.create_counter(
            "llmstream_worker_dead_letters", description="Records sent to the dead-letter topic."
        )
        self.produce_latency = meter.create_histogram(
            "llmstream_worker_produce_latency_seconds",
            unit="s",
            description="Terminal event handed to the producer -> acknowledged by the broker.",
            explicit_bucket_boundaries_advisory=PRODUCE_LATENCY_BUCKETS,
        )
        # Series without labels exist from the start (at 0): rate() and alerts see them
        # before the first occurrence.
        for counter in (
            self.tokens,
            self.token_events,
            self.model_deltas,
            self.retries,
            self.takeovers,
            self.dead_letters,
        ):
            counter.add(0)
        meter.create_observable_gauge(
            "llmstream_worker_inflight",
            callbacks=[self._observe_inflight],
            description="Requests admitted and not finished.",
        )
        meter.create_observable_gauge(
            "llmstream_worker_prompt_lag",
            callbacks=[self._observe_prompt_lag],
            description="Records of an assigned prompts partition not committed yet (queued, "
            "running, or finished behind a running one), by topic and partition.",
        )

    def _observe_inflight(self, _options: Any) -> Iterable[metrics.Observation]:
        yield metrics.Observation(self._inflight())

    def _observe_prompt_lag(self, _options: Any) -> Iterable[metrics.Observation]:
        for (topic, partition), lag in list(self.prompt_lag.items()):
            yield metrics.Observation(lag, {"topic": topic, "partition": partition})
