"""The aggregator process: Kafka (prompts + tokens) -> PostgreSQL projection -> Redis quota.

Exactly-once, by construction:
- offsets live in PostgreSQL (`consumer_offsets`), written in the same transaction as the
  projection rows they produced (`store.ProjectionStore.apply_batch`);
- on every assignment the consumer seeks to those offsets (Kafka's committed offsets are
  written afterwards, for lag tooling only, and never read);
- a consumer that lost its partitions without knowing (zombie) is fenced by the offsets check
  at the start of each transaction;
- Redis settlement is an outbox: committed with the bill, applied after the commit, retried
  until Redis accepts it, idempotent in Redis.

Nothing is kept in memory between batches except metrics, so `kill -9` at any point is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from psycopg_pool import AsyncConnectionPool

from aggregator import pgtext
from aggregator.log_bounds import check_log_bounds
from aggregator.metrics import AggregatorMetrics
from aggregator.projection import BadEvent, Coords
from aggregator.quota_settlement import QuotaSettler
from aggregator.reservation_reaper import ReservationReaper
from aggregator.store import Batch, BatchOutcome, Fenced, ProjectionStore, TopicPartitionKey
from llmstream import codec, config, kafka, tracing
from llmstream.fold import is_terminal
from llmstream.runner import Shutdown
from llmstream.telemetry import fields
from llmstream.tracing import Span, SpanKind

log = logging.getLogger("aggregator")

# Transient PostgreSQL conflicts: the same batch is simply tried again.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_NETWORK_TIMEOUT_S = 10.0
_MAX_BAD_LOGS_PER_BATCH = 20


@dataclass
class Settings:
    bootstrap: str
    database_url: str
    redis_url: str
    topics: Sequence[str]
    group: str
    batch_max: int = 2000
    store_text: bool = True
    dlq_topic: str | None = None
    instance_id: str | None = None
    session_timeout_ms: int = 10_000
    poll_timeout_ms: int = 200
    fetch_max_wait_ms: int = 50
    # The projection is not latency-critical: at low rates the broker holds a fetch until this
    # much data or fetch_max_wait_ms, so one batch (one PostgreSQL transaction) covers up to
    # 50 ms of events instead of each event alone (3x less aggregator CPU and PostgreSQL work
    # per token at 400 tokens/s; `llmstream bench`). Under load batches are full anyway.
    fetch_min_bytes: int = 64 * 1024
    outbox_sweep_s: float = 5.0
    stats_log_s: float = 30.0
    # A terminal request still waiting for its submitted event this long is reported.
    orphan_grace_s: float = 300.0
    orphan_check_s: float = 30.0
    pg_statement_timeout_ms: int = 30_000
    # Reservations whose request never reached the log are reaped after this long
    # (aggregator/reservation_reaper.py).
    reservation_reap_s: float = field(
        default_factory=lambda: config.get_float("AGGREGATOR_RESERVATION_REAP_S")
    )


@dataclass
class Totals:
    events: int = 0
    bills: int = 0
    bad: int = 0
    batches: int = 0
    fenced: int = 0
    offset_gaps: int = 0
    started: float = field(default_factory=time.monotonic)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the batch in progress commit before another consumer gets its partitions.
        async with self.agg.batch_lock:
            self.agg.assignment_generation += 1
        log.info("partitions revoked", extra=fields(partitions=_tp_names(revoked)))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.agg.assignment_generation += 1
        self.agg.needs_seek |= set(assigned)
        log.info("partitions assigned", extra=fields(partitions=_tp_names(assigned)))
        try:
            await self.agg.seek_from_postgres(set(assigned))
        except Exception as exc:
            # The consumer loop retries before it projects anything of these partitions.
            log.warning("seek on assignment failed, will retry", extra=fields(error=str(exc)))


def _tp_names(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in tps)


class Aggregator:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.store = ProjectionStore(settings.group, store_text=settings.store_text)
        self.metrics = AggregatorMetrics()
        self.totals = Totals()
        self.batch_lock = asyncio.Lock()
        self.needs_seek: set[TopicPartition] = set()
        self.assignment_generation = 0
        self.pool: AsyncConnectionPool | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.dead_letters: kafka.DeadLetterWriter | None = None
        self.redis: aioredis.Redis | None = None
        self.settler: QuotaSettler | None = None
        self.reaper: ReservationReaper | None = None
        # Next offsets committed to PostgreSQL by this process (for lag and Kafka commits).
        self.committed: dict[TopicPartition, int] = {}
        self._last_sweep = 0.0
        self._last_orphan_check = time.monotonic()
        # Orphans already reported by this process (bounded; orphans are rare by nature).
        self._reported_orphans: set[str] = set()
        self._last_stats = time.monotonic()
        self._stats_events = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.s
        self.pool = AsyncConnectionPool(
            s.database_url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=_NETWORK_TIMEOUT_S,
            kwargs={
                "connect_timeout": int(_NETWORK_TIMEOUT_S),
                "options": f"-c statement_timeout={s.pg_statement_timeout_ms}",
            },
        )
        await self.pool.open(wait=True, timeout=30)
        self.redis = aioredis.from_url(
            s.redis_url, socket_timeout=_NETWORK_TIMEOUT_S, socket_connect_timeout=5
        )
        self.settler = QuotaSettler(self.redis)
        self.reaper = ReservationReaper(
            self.redis, self.store.t("requests"), s.reservation_reap_s, self.metrics
        )
        conn = kafka.Connection(s.bootstrap)
        if s.dlq_topic:
            self.producer = kafka.event_producer(
                conn, s.group, request_timeout_ms=int(_NETWORK_TIMEOUT_S * 1000)
            )
            await asyncio.wait_for(self.producer.start(), 30)
            self.dead_letters = kafka.DeadLetterWriter(self.producer, s.dlq_topic, by=s.group)
        self.consumer = kafka.group_consumer(
            conn,
            s.instance_id or s.group,
            s.group,
            session_timeout_ms=s.session_timeout_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            heartbeat_interval_ms=max(1000, s.session_timeout_ms // 3),
            group_instance_id=s.instance_id or None,
            isolation_level="read_committed",
            fetch_min_bytes=s.fetch_min_bytes,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            request_timeout_ms=int(_NETWORK_TIMEOUT_S * 1000) + s.session_timeout_ms,
        )
        self.consumer.subscribe(list(s.topics), listener=_Listener(self))
        await asyncio.wait_for(self.consumer.start(), 30)
        log.info(
            "aggregator started",
            extra=fields(group=s.group, topics=list(s.topics), batch_max=s.batch_max),
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sweep_outbox(force=True), _NETWORK_TIMEOUT_S)
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), 15)
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.producer.stop(), 15)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close(timeout=5)
        self._log_stats(final=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set (SIGTERM), finishing the batch in progress."""
        await self.start()
        backoff = 0.5
        try:
            await self.sweep_outbox(force=True)
            while not stop.is_set():
                try:
                    await self.step()
                    backoff = 0.5
                except Exception as exc:
                    log.error(
                        "batch failed; re-seeking from PostgreSQL after backoff",
                        exc_info=not isinstance(exc, psycopg.OperationalError | KafkaError),
                        extra=fields(error=str(exc), backoff_s=backoff),
                    )
                    self.metrics.batches.add(1, {"outcome": "failed"})
                    self.needs_seek |= self._assignment()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            await self.close()

    # -- one iteration -------------------------------------------------------------------------

    def _assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment()) if self.consumer is not None else set()

    async def step(self) -> None:
        assert self.consumer is not None
        generation = self.assignment_generation
        data = await self.consumer.getmany(
            timeout_ms=self.s.poll_timeout_ms, max_records=self.s.batch_max
        )
        async with self.batch_lock:
            if self.needs_seek or generation != self.assignment_generation:
                # A rebalance or a failure happened while fetching: these records may come from
                # positions PostgreSQL does not vouch for, and the consumer has moved past them.
                # Drop them and seek every partition back to the stored offsets.
                self.needs_seek |= self._assignment()
                await self.seek_from_postgres(set(self.needs_seek))
                return
            assigned = self._assignment()
            records = [r for tp, rs in data.items() if tp in assigned for r in rs]
            for tp, rs in data.items():
                if rs and tp in assigned:
                    self.metrics.lag.oldest_pending_ms[(tp.topic, tp.partition)] = rs[0].timestamp
            outcome = await self.project(records) if records else None
        await self._after_batch(outcome)

    async def _after_batch(self, outcome: BatchOutcome | None) -> None:
        # Outside the lock: a rebalance waiting for it must not wait for Redis or Kafka too.
        if outcome is not None:
            if outcome.settlements:
                await self._settle(outcome.settlements)
            await self._commit_kafka(outcome.next_offsets)
        self._refresh_lag()
        await self.sweep_outbox()
        await self.check_orphans()
        assert self.reaper is not None and self.pool is not None
        await self.reaper.maybe_reap(self.pool)
        self._log_stats()

    async def seek_from_postgres(self, tps: set[TopicPartition]) -> None:
        """Position these partitions at the offsets stored in PostgreSQL (start if none)."""
        assert self.pool is not None and self.consumer is not None
        tps &= self._assignment()
        if not tps:
            self.needs_seek.clear()
            return
        async with self.pool.connection(timeout=_NETWORK_TIMEOUT_S) as conn:
            stored = await self.store.load_offsets(conn, ((tp.topic, tp.partition) for tp in tps))
        await check_log_bounds(self.consumer, tps, stored, _NETWORK_TIMEOUT_S)
        fresh = []
        for tp in tps:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                fresh.append(tp)
            else:
                self.consumer.seek(tp, offset)
                self.committed[tp] = offset
        if fresh:
            await asyncio.wait_for(self.consumer.seek_to_beginning(*fresh), _NETWORK_TIMEOUT_S)
        self.needs_seek -= tps
        log.info(
            "positions restored from PostgreSQL",
            extra=fields(
                offsets={
                    f"{tp.topic}/{tp.partition}": stored.get((tp.topic, tp.partition), "beginning")
                    for tp in tps
                }
            ),
        )

    async def project(self, records: list[Any]) -> BatchOutcome | None:
        """Project records in one transaction; None if fenced (nothing written)."""
        started = time.perf_counter()
        batch = Batch()
        undecodable: list[tuple[Any, str]] = []
        for r in records:
            coords = Coords(r.topic, r.partition, r.offset, r.timestamp)
            batch.consumed(coords)
            try:
                event = pgtext.decode(r)  # NUL-free strings: PostgreSQL refuses NUL
            except codec.DecodeError as exc:
                undecodable.append((r, str(exc)))
                continue
            batch.events.append((coords, event))
        if undecodable:
            await self._park(undecodable)
        spans = self._terminal_spans(batch)
        outcome = await self._apply(batch)
        if outcome is not None:
            self._after_commit(outcome, records, time.perf_counter() - started)
        billed = {row.bill.request_id for row in outcome.ledger} if outcome else set()
        for request_id, span in spans:
            span.set_attribute("llmstream.billed", request_id in billed)
            if outcome is None:
                span.set_attribute("llmstream.fenced", True)
            span.end()
        return outcome

    def _terminal_spans(self, batch: Batch) -> list[tuple[str, Span]]:
        """One span per terminal event (the request's trace ends with its bill); none for
        the other events (no per-token spans)."""
        spans = []
        for coords, event in batch.events:
            if not is_terminal(event):
                continue
            spans.append(
                (
                    event.request_id,
                    tracing.tracer().start_span(
                        f"process {coords.topic}",
                        context=tracing.context_of(event.trace.traceparent, event.trace.tracestate),
                        kind=SpanKind.CONSUMER,
                        attributes=tracing.kafka_attributes(
                            "process",
                            coords.topic,
                            partition=coords.partition,
                            key=event.request_id,
                            offset=coords.offset,
                            group=self.s.group,
                        ),
                    ),
                )
            )
        return spans

    async def _apply(self, batch: Batch) -> BatchOutcome | None:
        assert self.pool is not None
        for attempt in range(1, 6):
            try:
                async with self.pool.connection(timeout=_NETWORK_TIMEOUT_S) as conn:
                    return await self.store.apply_batch(conn, batch)
            except Fenced as exc:
                # Another consumer projected these records: ours are stale. Re-seek, refetch.
                log.warning("batch fenced", extra=fields(error=str(exc)))
                self.metrics.batches.add(1, {"outcome": "fenced"})
                self.totals.fenced += 1
                self.needs_seek |= self._assignment()
                return None
            except _RETRYABLE as exc:
                log.warning(
                    "batch conflict, retrying", extra=fields(error=str(exc), attempt=attempt)
                )
                self.metrics.batches.add(1, {"outcome": "retried"})
                await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
        raise RuntimeError("batch kept conflicting with concurrent transactions")

    def _after_commit(self, outcome: BatchOutcome, records: list[Any], elapsed: float) -> None:
        m = self.metrics
        m.batches.add(1, {"outcome": "committed"})
        m.batch_seconds.record(elapsed)
        per_topic: dict[str, int] = {}
        for r in records:
            per_topic[r.topic] = per_topic.get(r.topic, 0) + 1
        for topic, n in per_topic.items():
            m.events.add(n, {"topic": topic})
        if outcome.ledger:
            m.bills.add(len(outcome.ledger))
        if outcome.offset_gaps:
            m.offset_gaps.add(outcome.offset_gaps)
            self.totals.offset_gaps += outcome.offset_gaps
        if outcome.duplicate_bills:
            m.duplicate_bills.add(outcome.duplicate_bills)
            log.error(
                "ledger refused duplicate bills (a bug: billing state and ledger disagree)",
                extra=fields(count=outcome.duplicate_bills),
            )
        self._log_bad(outcome.bad)
        for coords, rid in outcome.parked:
            log.debug(
                "terminal event before its submit: parked",
                extra=fields(
                    request_id=rid,
                    topic=coords.topic,
                    partition=coords.partition,
                    offset=coords.offset,
                ),
            )
        for (topic, partition), offset in outcome.next_offsets.items():
            self.committed[TopicPartition(topic, partition)] = offset
        t = self.totals
        t.events += len(records)
        t.bills += len(outcome.ledger)
        t.batches += 1
        self._stats_events += len(records)

    def _log_bad(self, bad: list[BadEvent]) -> None:
        for i, b in enumerate(bad):
            self.metrics.bad_events.add(1, {"reason": b.reason})
            self.totals.bad += 1
            if i < _MAX_BAD_LOGS_PER_BATCH:
                log.warning(
                    "bad event",
                    extra=fields(
                        reason=b.reason,
                        detail=b.detail,
                        request_id=b.request_id,
                        topic=b.coords.topic,
                        partition=b.coords.partition,
                        offset=b.coords.offset,
                    ),
                )
        if len(bad) > _MAX_BAD_LOGS_PER_BATCH:
            log.warning("more bad events in this batch", extra=fields(count=len(bad)))

    async def _park(self, undecodable: list[tuple[Any, str]]) -> None:
        """Copy undecodable records to the dead-letter topic (before the offsets move past them)."""
        bad = [
            BadEvent(Coords(r.topic, r.partition, r.offset, r.timestamp), "undecodable", reason)
            for r, reason in undecodable
        ]
        # Counted after the commit would be nicer, but a crash in between only re-counts.
        self._log_bad(bad)
        if self.dead_letters is None:
            return
        for r, reason in undecodable:
            try:
                await asyncio.wait_for(self.dead_letters.send(r, reason), _NETWORK_TIMEOUT_S)
                self.metrics.dlq.add(1, {"result": "sent"})
            except (KafkaError, TimeoutError) as exc:
                # Never block billing on the dead-letter topic: the record stays in its topic
                # and the log line above has its coordinates.
                self.metrics.dlq.add(1, {"result": "failed"})
                log.error("dead-letter send failed", extra=fields(error=str(exc)))

    async def _settle(self, settlements: Sequence[Any]) -> None:
        assert self.settler is not None and self.pool is not None
        try:
            applied = await self.settler.settle(settlements)
            async with self.pool.connection(timeout=_NETWORK_TIMEOUT_S) as conn:
                await self.store.delete_settled(conn, [s.request_id for s in settlements])
                await conn.commit()
            self.metrics.settlements.add(applied)
        except Exception as exc:
            # The outbox keeps them; the sweep retries.
            self.metrics.settlement_errors.add(1)
            log.warning("quota settlement deferred", extra=fields(error=str(exc)))

    async def sweep_outbox(self, force: bool = False) -> None:
        """Retry settlements left in the outbox (Redis was down, or a crash after commit)."""
        now = time.monotonic()
        if not force and now - self._last_sweep < self.s.outbox_sweep_s:
            return
        self._last_sweep = now
        assert self.pool is not None and self.settler is not None
        try:
            while True:
                async with (
                    self.pool.connection(timeout=_NETWORK_TIMEOUT_S) as conn,
                    conn.transaction(),
                ):
                    pending = await self.store.pending_settlements(conn, 1000)
                    if not pending:
                        return
                    applied = await self.settler.settle(pending)
                    await self.store.delete_settled(conn, [p.request_id for p in pending])
                self.metrics.settlements.add(applied)
                log.info(
                    "outbox settlements applied",
                    extra=fields(pending=len(pending), applied=applied),
                )
                if len(pending) < 1000:
                    return
        except Exception as exc:
            self.metrics.settlement_errors.add(1)
            log.warning("outbox sweep failed", extra=fields(error=str(exc)))

    async def check_orphans(self, force: bool = False) -> None:
        """Report terminal events whose request never got a submitted event (after a grace
        period: the tokens topic may simply be ahead of the prompts topic). Counted once per
        request and process as bad events; the requests stay parked, unbilled."""
        now = time.monotonic()
        if not force and now - self._last_orphan_check < self.s.orphan_check_s:
            return
        self._last_orphan_check = now
        assert self.pool is not None
        try:
            async with self.pool.connection(timeout=_NETWORK_TIMEOUT_S) as conn:
                total, found = await self.store.orphans(conn, self.s.orphan_grace_s, 1000)
        except Exception as exc:
            log.warning("orphan check failed", extra=fields(error=str(exc)))
            return
        self.metrics.parked = total
        bad = []
        for rid, coords in found:
            if rid in self._reported_orphans:
                continue
            if len(self._reported_orphans) >= 100_000:
                self._reported_orphans.clear()
            self._reported_orphans.add(rid)
            bad.append(
                BadEvent(
                    coords or Coords("?", -1, -1),
                    "terminal_unknown_request",
                    f"terminal event, but no submitted event after {self.s.orphan_grace_s:g}s: "
                    "parked unbilled",
                    rid,
                )
            )
        self._log_bad(bad)

    async def _commit_kafka(self, next_offsets: dict[TopicPartitionKey, int]) -> None:
        """Mirror the PostgreSQL offsets to Kafka for lag tooling (KEDA, kafka-consumer-groups).
        Never read back; failures are harmless."""
        assert self.consumer is not None
        offsets = {
            TopicPartition(t, p): OffsetAndMetadata(o, "") for (t, p), o in next_offsets.items()
        }
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), _NETWORK_TIMEOUT_S)
        except Exception as exc:
            log.debug("informational Kafka commit failed", extra=fields(error=str(exc)))

    def _refresh_lag(self) -> None:
        assert self.consumer is not None
        lag: dict[tuple[str, int], int] = {}
        for tp in self._assignment():
            high = self.consumer.highwater(tp)
            position = self.committed.get(tp)
            if high is None or position is None:
                continue
            lag[(tp.topic, tp.partition)] = max(0, high - position)
        self.metrics.lag.events = lag

    def _log_stats(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_stats < self.s.stats_log_s:
            return
        rate = self._stats_events / max(now - self._last_stats, 1e-9)
        t = self.totals
        log.info(
            "aggregator stopped" if final else "aggregator progress",
            extra=fields(
                events=t.events,
                bills=t.bills,
                bad_events=t.bad,
                batches=t.batches,
                fenced=t.fenced,
                events_per_s=round(rate, 1),
                lag_events=sum(self.metrics.lag.events.values()),
            ),
        )
        self._last_stats = now
        self._stats_events = 0


async def serve(settings: Settings, shutdown: Shutdown) -> int:
    """Project until SIGTERM/SIGINT, finishing the batch in progress."""
    agg = Aggregator(settings)
    await agg.run(shutdown.requested)
    return 0
