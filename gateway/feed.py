"""The token feed: every Kafka read of token events, and the one function that delivers them.

Three readers, one `deliver`:
- **owned**: this replica's own partitions of the tokens topic, assigned at start (no consumer
  group), read from their end. A new request's reply partition is one of them (`next_route`,
  round-robin), with the position reached so far as the lower bound of its first event's offset.
- **borrowed**: one shared reader of other replicas' partitions, each held for as long as some
  resumed request on it is followed here, starting at its end; released within a second after.
- **catch-up**: a short-lived reader per resume, replaying the request's reply partition from
  its recorded offset to the end offset taken when the resume began.

A resume is decided by `plan_resume` (pure): which partition, from which offset, and whether
the live half comes from the owned reader or a borrowed partition. The watch parks the live
events while the catch-up runs, and dedup by seq (the fold) joins the two without gap or
duplicate (gateway/router.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway import errors
from gateway.delivery_trace import DeliverySpans
from gateway.inflight import Inflight
from gateway.limits import ResumeSlot, ResumeSlots
from gateway.metrics import GatewayMetrics, outcome_label
from gateway.quota import Quota
from gateway.router import WEBSOCKET_FRAMES, Frames, Outbox, Router, Watch
from gateway.store import ReplyRoute, RequestMeta, RequestStore
from gateway.tasks import TaskSet
from llmstream import codec, kafka, telemetry
from llmstream.fold import is_terminal, outcome
from llmstream.v1 import events_pb2

log = logging.getLogger("gateway")

# A catch-up fetches at most this much per partition and poll, so that it stays paced by its
# socket instead of filling the send buffer with one batch.
CATCH_UP_FETCH_BYTES = 256 * 1024
CATCH_UP_MAX_RECORDS = 500
# A catch-up (borrow + replay) that takes longer (a client reading slowly holds a slot while
# the replay waits for it) ends with an error: the client resumes again from where it got.
CATCH_UP_DEADLINE_S = 30.0
# A borrowed partition nobody follows any more is released after at most this long.
BORROW_CHECK_S = 1.0
SKIPPED_LOG_EVERY_S = 10.0


class Source(Enum):
    OWNED = "owned"
    BORROWED = "borrowed"
    CATCH_UP = "catch_up"


@dataclass(frozen=True)
class ResumePlan:
    """How a resume is served: replay `tp` from `start` (catch-up), then live events from the
    owned reader (`owned`) or from a borrowed partition."""

    tp: TopicPartition
    start: int
    owned: bool

    @property
    def live(self) -> str:
        """The `gateway_resumes` kind."""
        return "owned" if self.owned else "borrowed"

    @property
    def borrowed(self) -> tuple[str, int] | None:
        return None if self.owned else (self.tp.topic, self.tp.partition)


def plan_resume(route: ReplyRoute, tokens_topic: str, owned: Collection[int]) -> ResumePlan:
    return ResumePlan(
        TopicPartition(route.topic, route.partition),
        route.offset,
        owned=route.topic == tokens_topic and route.partition in owned,
    )


@dataclass(frozen=True)
class Resumption:
    watch: Watch
    plan: ResumePlan
    slot: ResumeSlot  # released when the catch-up ends (or its task does, whichever first)


async def _paced(outbox: Outbox) -> None:
    """A catch-up replays at its socket's pace: it waits while the send buffer is half full."""
    while len(outbox) > outbox.limit // 2 and not outbox.closed:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


@dataclass(kw_only=True, eq=False)
class TokenFeed:
    connection: kafka.Connection
    topic: str
    gateway_id: str
    owned_reader: AIOKafkaConsumer
    borrow_reader: AIOKafkaConsumer
    max_resumes: int  # concurrent catch-up readers at most
    inflight: Inflight
    quota: Quota
    store: RequestStore
    metrics: GatewayMetrics
    tasks: TaskSet
    router: Router = field(init=False)
    owned: list[int] = field(default_factory=list, init=False)
    # Owned partition -> lower bound of its next offset.
    low: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.router = Router(on_foreign=self._foreign)
        self.spans = DeliverySpans(self.topic)
        self._rr = 0
        self.resume_slots = ResumeSlots(self.max_resumes)
        self._borrow_lock = asyncio.Lock()
        self._borrow_checked = 0.0  # monotonic time the borrowed partitions were last pruned
        self._undecodable_skipped = 0
        self._undecodable_logged_at = -1e9
        self._foreign_skipped = 0
        self._foreign_logged_at = -1e9

    async def start(self, owned: list[int]) -> None:
        """Read `owned` partitions from their end on (`run_owned` delivers)."""
        self.owned = owned
        tps = [TopicPartition(self.topic, p) for p in owned]
        self.owned_reader.assign(tps)
        await self.owned_reader.seek_to_end(*tps)
        for tp in tps:
            self.low[tp.partition] = await self.owned_reader.position(tp)

    def owned_assignment(self) -> set[int]:
        return {tp.partition for tp in self.owned_reader.assignment()}

    def borrowed_assignment(self) -> set[int]:
        return {tp.partition for tp in self.borrow_reader.assignment()}

    def next_route(self) -> ReplyRoute:
        """The reply partition of a new request (round-robin over the owned ones)."""
        partition = self.owned[self._rr % len(self.owned)]
        self._rr += 1
        return ReplyRoute(self.topic, partition, self.low[partition])

    # ---- delivery ------------------------------------------------------------------------

    def deliver(
        self, records: Iterable[Any], source: Source, route: Callable[[events_pb2.Event], int]
    ) -> None:
        """Decode records and hand each event to `route` (the router: every watch of its
        request; or the one watch a catch-up is for), which says how many watches it reached.
        A terminal event ends the request here (outcome counted, stream slot freed at once).
        One bad record or event never stops delivery to the others."""
        finished: list[tuple[str, str]] = []
        ended: list[str] = []  # terminal events of this replica's own partitions
        for rec in records:
            try:
                event = codec.decode_record(rec)  # compact token events: id from the key
            except codec.DecodeError as exc:
                self._undecodable(rec, str(exc))
                continue
            if source is Source.OWNED:
                self.metrics.token_events += 1
            try:
                delivered = route(event)
                if source is not Source.CATCH_UP:
                    self.spans.on_event(event, rec.partition, rec.offset, delivered)
            except Exception:
                log.exception("routing an event failed")
            if not is_terminal(event):
                continue
            if source is Source.OWNED:
                ended.append(event.request_id)
            if self.inflight.finish(event.request_id):
                self.metrics.requests[outcome_label(outcome(event))] += 1
                if event.tenant_id:
                    finished.append((event.tenant_id, event.request_id))
        if finished:
            # ZREM is idempotent: the aggregator's settlement frees them too, later.
            self.tasks.spawn(self.quota.end_streams(finished))
        if ended:
            # Their records say so: a cancel is then answered without a Kafka write.
            self.tasks.spawn(self.store.mark_finished(ended))

    def _undecodable(self, rec: Any, reason: str) -> None:
        """A record that is not an llmstream event is skipped (the aggregator parks it in the
        dead-letter topic); one log line per 10 s at most, with the count skipped since."""
        self._undecodable_skipped += 1
        now = time.monotonic()
        if now - self._undecodable_logged_at < SKIPPED_LOG_EVERY_S:
            return
        log.warning(
            "undecodable record skipped",
            extra=telemetry.fields(
                reason=reason,
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                skipped=self._undecodable_skipped,
            ),
        )
        self._undecodable_logged_at, self._undecodable_skipped = now, 0

    def _foreign(self, watch: Watch, event: events_pb2.Event) -> None:
        """An event of a watched request naming another tenant than the watch's: dropped
        (router.py), counted, and logged once per 10 s at most with the count since."""
        self.metrics.foreign_events += 1
        self._foreign_skipped += 1
        now = time.monotonic()
        if now - self._foreign_logged_at < SKIPPED_LOG_EVERY_S:
            return
        log.warning(
            "event of another tenant dropped",
            extra=telemetry.fields(
                request_id=event.request_id,
                event_tenant=event.tenant_id,
                watch_tenant=watch.tenant_id,
                dropped=self._foreign_skipped,
            ),
        )
        self._foreign_logged_at, self._foreign_skipped = now, 0

    # ---- live readers (supervised loops) -------------------------------------------------

    async def run_owned(self) -> None:
        while True:
            batch = await self._poll(Source.OWNED, self._fetch_owned)
            for tp, records in batch.items():
                if records:
                    self.low[tp.partition] = records[-1].offset + 1
                self.deliver(records, Source.OWNED, self.router.deliver)
            await asyncio.sleep(0)

    async def run_borrowed(self) -> None:
        while True:
            batch = await self._poll(Source.BORROWED, self._fetch_borrowed)
            if not batch:
                await asyncio.sleep(0.02)
                continue
            for records in batch.values():
                self.deliver(records, Source.BORROWED, self.router.deliver)
            await asyncio.sleep(0)

    async def _poll(
        self, source: Source, fetch: Callable[[], Awaitable[dict[TopicPartition, list[Any]]]]
    ) -> dict[TopicPartition, list[Any]]:
        """One fetch of a live reader. A failure (a broker restarting) is logged and retried
        after a pause: the loop goes on, and no record is skipped (the position stays)."""
        try:
            return await fetch()
        except Exception:
            log.exception("%s tokens reader failed; retrying", source.value)
            await asyncio.sleep(0.5)
            return {}

    async def _fetch_owned(self) -> dict[TopicPartition, list[Any]]:
        batch: dict[TopicPartition, list[Any]] = await self.owned_reader.getmany(timeout_ms=200)
        return batch

    async def _fetch_borrowed(self) -> dict[TopicPartition, list[Any]]:
        """Every second, first release the borrowed partitions no watch needs any more."""
        async with self._borrow_lock:
            if time.monotonic() - self._borrow_checked > BORROW_CHECK_S:
                self._borrow_checked = time.monotonic()
                needed = {TopicPartition(t, p) for t, p in self.router.borrowed()}
                await self._reassign_borrowed(needed & set(self.borrow_reader.assignment()))
            if not self.borrow_reader.assignment():
                return {}
            batch: dict[TopicPartition, list[Any]] = await self.borrow_reader.getmany(timeout_ms=20)
            return batch

    async def _reassign_borrowed(self, wanted: set[TopicPartition]) -> None:
        """Change the borrowed partitions; kept ones continue where they were, new ones start
        at their end (the resume's catch-up covers everything before). Under _borrow_lock."""
        c = self.borrow_reader
        current = set(c.assignment())
        if wanted == current:
            return
        positions = {tp: await c.position(tp) for tp in current & wanted}
        c.assign(sorted(wanted, key=lambda t: (t.topic, t.partition)))
        for tp, pos in positions.items():
            c.seek(tp, pos)
        new = wanted - current
        if new:
            await c.seek_to_end(*new)
            for tp in new:
                await c.position(tp)

    async def _borrow(self, tp: TopicPartition) -> None:
        async with self._borrow_lock:
            if tp not in self.borrow_reader.assignment():
                await self._reassign_borrowed(set(self.borrow_reader.assignment()) | {tp})

    # ---- following a request -------------------------------------------------------------

    def follow(self, watch: Watch) -> None:
        """A new request of this replica: its events come from the owned reader."""
        self.router.add(watch)

    def unfollow(self, watch: Watch) -> None:
        self.router.remove(watch)

    def take_resume_slot(self, meta: RequestMeta) -> ResumeSlot:
        """A catch-up slot for a resume of `meta`'s request (its tenant's share of
        GATEWAY_MAX_RESUMES), or `GatewayError` overloaded. Release it if no `resume` follows."""
        slot = self.resume_slots.take(meta.tenant_id)
        if slot is None:
            self.metrics.resume_refusals["slots"] += 1
            raise errors.overloaded("too many resumes in progress", request_id=meta.request_id)
        return slot

    def resume(
        self,
        meta: RequestMeta,
        after_seq: int,
        outbox: Outbox,
        frames: Frames = WEBSOCKET_FRAMES,
        *,
        slot: ResumeSlot,
        keep_text: bool = False,
    ) -> Resumption:
        """Start following a request from `after_seq` on: its watch parks live events from now
        on, since the catch-up replays only up to the end offset it takes after this point.
        Run `catch_up` next (its task should release `slot` when it ends, in case it never
        starts). `keep_text`: the watch keeps the whole text (gateway/router.py)."""
        plan = plan_resume(meta.route, self.topic, self.owned)
        watch = Watch(
            meta.request_id,
            outbox,
            after_seq,
            meta.submitted_ms,
            catching_up=True,
            borrowed=plan.borrowed,
            frames=frames,
            keep_text=keep_text,
            tenant_id=meta.tenant_id,
        )
        self.router.add(watch)
        return Resumption(watch, plan, slot)

    async def catch_up(self, r: Resumption) -> None:
        """Borrow the reply partition if another replica owns it, replay the request's events
        the client has not seen, then hand the watch to the live reader. On a failure, or
        past CATCH_UP_DEADLINE_S, the watch is dropped (`GatewayError`: the stream would have
        a gap; the client resumes again)."""
        watch, plan = r.watch, r.plan
        try:
            async with asyncio.timeout(CATCH_UP_DEADLINE_S):
                await self._catch_up(watch, plan)
        except TimeoutError:
            self.router.remove(watch)
            self.metrics.resume_refusals["deadline"] += 1
            raise errors.overloaded(
                f"resume took longer than {CATCH_UP_DEADLINE_S:g} s (reading too slowly?): "
                "resume again from the last seq received",
                request_id=watch.request_id,
            ) from None
        finally:
            r.slot.release()
        watch.end_catch_up()
        if watch.finished:
            self.router.remove(watch)

    async def _catch_up(self, watch: Watch, plan: ResumePlan) -> None:
        if not plan.owned:
            try:
                await self._borrow(plan.tp)
            except Exception:
                log.exception("borrowing a partition failed")
                self.router.remove(watch)
                raise errors.resume_failed(watch.request_id) from None
        self.metrics.resumes[plan.live] += 1
        try:
            await self._replay(watch, plan)
        except Exception:
            log.exception("resume read failed")
            self.router.remove(watch)
            raise errors.resume_failed(watch.request_id) from None

    async def _replay(self, watch: Watch, plan: ResumePlan) -> None:
        key = watch.request_id.encode()

        def into_watch(event: events_pb2.Event) -> int:
            if not watch.accepts(event):
                self._foreign(watch, event)
                return 0
            watch.apply(event)
            return 1

        reader = kafka.reader(
            self.connection,
            f"{self.gateway_id}-resume",
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=CATCH_UP_FETCH_BYTES,
        )
        try:
            await reader.start()
            end = (await kafka.end_offsets(reader, [plan.tp]))[plan.tp]
            await _paced(watch.outbox)
            # An async generator: closed at once when the replay stops early.
            batches = cast(
                AsyncGenerator[list[Any], None],
                kafka.read_range(
                    reader,
                    [kafka.PartitionRange(plan.tp, plan.start, end)],
                    max_records=CATCH_UP_MAX_RECORDS,
                    poll_ms=200,
                ),
            )
            async with contextlib.aclosing(batches):
                async for records in batches:
                    mine = [r for r in records if r.key == key]
                    self.deliver(mine, Source.CATCH_UP, into_watch)
                    if watch.finished or watch.outbox.closed:
                        return
                    await _paced(watch.outbox)
        finally:
            await reader.stop()
