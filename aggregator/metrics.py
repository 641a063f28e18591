"""OpenTelemetry instruments of the aggregator (exported to Prometheus by
llmstream.telemetry.setup_metrics; names get `_total` / unit suffixes there).

Lag gauges read plain numbers the consumer loop refreshes after every poll: exporter callbacks
run on the HTTP server's thread and must not touch the Kafka client.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics


@dataclass
class LagSnapshot:
    # (topic, partition) -> records not yet projected
    events: dict[tuple[str, int], int] = field(default_factory=dict)
    # (topic, partition) -> timestamp (ms) of the oldest record not yet projected, as last
    # seen: the first record of the batch taken from that partition (a batch always starts at
    # the stored position).
    oldest_pending_ms: dict[tuple[str, int], int] = field(default_factory=dict)

    def seconds(self, now_ms: int | None = None) -> dict[tuple[str, int], float]:
        """Projection delay per partition: 0 when caught up, otherwise the age of the oldest
        record not yet projected (it grows while the aggregator is stuck)."""
        now = time.time() * 1000 if now_ms is None else now_ms
        out = {}
        for tp, lag in self.events.items():
            oldest = self.oldest_pending_ms.get(tp)
            out[tp] = 0.0 if lag <= 0 or oldest is None else max(0.0, (now - oldest) / 1000)
        return out


# Time to project one batch (up to AGGREGATOR_BATCH_MAX records in one transaction).
BATCH_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class AggregatorMetrics:
    def __init__(self, meter: Any | None = None) -> None:
        meter = meter if meter is not None else metrics.get_meter("llmstream.aggregator")
        self.lag = LagSnapshot()
        self.parked = 0
        self.events = meter.create_counter(
            "llmstream_aggregator_events", description="Records projected, by topic."
        )
        self.bad_events = meter.create_counter(
            "llmstream_aggregator_bad_events",
            description="Records skipped or parked, by reason (undecodable, "
            "terminal_unknown_request, tenant_mismatch, ...).",
        )
        self.bills = meter.create_counter(
            "llmstream_aggregator_bills", description="Ledger rows written (one per request)."
        )
        self.duplicate_bills = meter.create_counter(
            "llmstream_aggregator_duplicate_bills",
            description="Bills refused by the ledger's unique constraint (must stay 0).",
        )
        self.offset_gaps = meter.create_counter(
            "llmstream_aggregator_offset_gaps",
            description="Offsets between a stored position and the next batch that carried no "
            "record (transaction markers, compaction); nonzero on plain topics means trouble.",
        )
        self.batches = meter.create_counter(
            "llmstream_aggregator_batches",
            description="Batch transactions by outcome (committed, fenced, retried, failed).",
        )
        self.batch_seconds = meter.create_histogram(
            "llmstream_aggregator_batch_duration",
            unit="s",
            description="Time to project one batch (decode, fold, PostgreSQL transaction).",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.settlements = meter.create_counter(
            "llmstream_aggregator_quota_settlements",
            description="Quota settlements applied to Redis (already-settled ones excluded).",
        )
        self.settlement_errors = meter.create_counter(
            "llmstream_aggregator_quota_settlement_errors",
            description="Failed Redis settlement rounds (retried from the outbox).",
        )
        self.reaped_reservations = meter.create_counter(
            "llmstream_aggregator_reaped_reservations",
            description="Quota reservations taken back because their request never reached the "
            "log (LLMSTREAM_AGGREGATOR_RESERVATION_REAP_S).",
        )
        self.reaped_tokens = meter.create_counter(
            "llmstream_aggregator_reaped_reservation_tokens",
            description="Tokens of the reaped reservations.",
        )
        self.dlq = meter.create_counter(
            "llmstream_aggregator_dead_letters",
            description="Records copied to the dead-letter topic, by result (sent, failed).",
        )
        # Series without labels exist from the start (at 0): rate() and alerts see them
        # before the first occurrence.
        for counter in (
            self.bills,
            self.duplicate_bills,
            self.offset_gaps,
            self.settlements,
            self.settlement_errors,
            self.reaped_reservations,
            self.reaped_tokens,
        ):
            counter.add(0)
        meter.create_observable_gauge(
            "llmstream_aggregator_parked_requests",
            callbacks=[self._parked],
            description="Terminal requests without a submitted event after the grace period "
            "(unbilled; see docs/aggregator.md).",
        )
        meter.create_observable_gauge(
            "llmstream_aggregator_lag_events",
            callbacks=[self._lag_events],
            description="Records in the topic not yet projected, by topic and partition.",
        )
        meter.create_observable_gauge(
            "llmstream_aggregator_lag_seconds",
            callbacks=[self._lag_seconds],
            unit="s",
            description="Projection delay: 0 when caught up, else the age of the oldest record "
            "not yet projected (Kafka record timestamp).",
        )

    def _parked(self, _options: Any) -> Iterable[metrics.Observation]:
        yield metrics.Observation(self.parked)

    def _lag_events(self, _options: Any) -> Iterable[metrics.Observation]:
        for (topic, partition), lag in list(self.lag.events.items()):
            yield metrics.Observation(lag, {"topic": topic, "partition": partition})

    def _lag_seconds(self, _options: Any) -> Iterable[metrics.Observation]:
        for (topic, partition), lag in self.lag.seconds().items():
            yield metrics.Observation(lag, {"topic": topic, "partition": partition})
