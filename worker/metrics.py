"""OpenTelemetry instruments of the worker (exported to Prometheus by
llmstream.telemetry.setup_metrics; names get `_total` suffixes there).

Counters are added once per request at its end (not per token), so they cost nothing on the
hot path. Without `setup_metrics` the OpenTelemetry API is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics


class WorkerMetrics:
    def __init__(self, inflight: Callable[[], int]) -> None:
        meter = metrics.get_meter("llmstream.worker")
        self._inflight = inflight
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
        meter.create_observable_gauge(
            "llmstream_worker_inflight",
            callbacks=[self._observe_inflight],
            description="Requests admitted and not finished.",
        )

    def _observe_inflight(self, _options: Any) -> Iterable[metrics.Observation]:
        yield metrics.Observation(self._inflight())
