"""The token feed without Kafka: which reader serves a resume (own partition, borrowed, catch-up
from which offset), the one deliver function of all three readers, the catch-up + live merge
(dedup by seq), and a catch-up that fails."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition

from gateway import feed as feed_module
from gateway.errors import GatewayError
from gateway.feed import ResumePlan, Resumption, Source, TokenFeed, plan_resume
from gateway.inflight import Inflight
from gateway.metrics import GatewayMetrics
from gateway.quota import Quota
from gateway.router import Outbox, Watch
from gateway.store import ReplyRoute, RequestMeta, RequestStore
from gateway.tasks import TaskSet
from llmstream import codec, kafka
from llmstream.v1 import common_pb2, events_pb2

TOPIC = "tokens"


# ---- which reader serves a resume ---------------------------------------------------------------


def test_resume_on_an_owned_partition_replays_then_reads_live_from_the_own_reader() -> None:
    plan = plan_resume(ReplyRoute(TOPIC, 2, 1500), TOPIC, [0, 1, 2])
    assert plan == ResumePlan(TopicPartition(TOPIC, 2), 1500, owned=True)
    assert plan.live == "owned" and plan.borrowed is None


def test_resume_on_another_replicas_partition_borrows_it() -> None:
    plan = plan_resume(ReplyRoute(TOPIC, 7, 10), TOPIC, [0, 1, 2])
    assert (plan.start, plan.owned, plan.live, plan.borrowed) == (10, False, "borrowed", (TOPIC, 7))


def test_resume_of_a_request_on_another_tokens_topic_is_never_owned() -> None:
    plan = plan_resume(ReplyRoute("old.tokens", 1, 0), TOPIC, [0, 1, 2])
    assert plan.borrowed == ("old.tokens", 1) and plan.tp == TopicPartition("old.tokens", 1)


# ---- fakes --------------------------------------------------------------------------------------


@dataclass
class Rec:
    value: bytes | None
    key: bytes
    offset: int
    partition: int = 0
    topic: str = TOPIC
    timestamp: int = 1_700_000_000_000


def delta(rid: str, seq: int) -> events_pb2.Event:
    ev = codec.new_event(rid, "t1")
    ev.token_delta.seq = seq
    ev.token_delta.text = f"<{seq}>"
    return ev


def completed(rid: str, last: int, tenant: str = "t1") -> events_pb2.Event:
    ev = codec.new_event(rid, tenant)
    ev.completed.finish_reason = common_pb2.FINISH_REASON_LENGTH
    ev.completed.last_seq = last
    return ev


def records(events: Sequence[events_pb2.Event], first_offset: int = 0) -> list[Rec]:
    return [Rec(codec.encode(ev), codec.key(ev), first_offset + i) for i, ev in enumerate(events)]


class FakeQuota(Quota):
    def __init__(self) -> None:  # no Redis
        self.ended: list[tuple[str, str]] = []

    async def end_streams(self, finished: list[tuple[str, str]]) -> None:
        self.ended += finished


class FakeStore(RequestStore):
    def __init__(self) -> None:  # no Redis
        self.finished: list[str] = []

    async def mark_finished(self, request_ids: list[str]) -> None:
        self.finished += request_ids


class FakeReader:
    """The part of an AIOKafkaConsumer the feed uses for owned and borrowed partitions."""

    def __init__(self, fail_seek: bool = False) -> None:
        self.assigned: list[TopicPartition] = []
        self.fail_seek = fail_seek

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = list(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    async def seek_to_end(self, *tps: TopicPartition) -> None:
        if self.fail_seek:
            raise ConnectionError("broker gone")

    async def position(self, tp: TopicPartition) -> int:
        return 100 + int(tp.partition)


def new_feed(owned: list[int] | None = None, max_resumes: int = 4) -> TokenFeed:
    f = TokenFeed(
        connection=kafka.Connection("unused:9092"),
        topic=TOPIC,
        gateway_id="gw-0",
        owned_reader=FakeReader(),
        borrow_reader=FakeReader(),
        max_resumes=max_resumes,
        inflight=Inflight(),
        quota=FakeQuota(),
        store=FakeStore(),
        metrics=GatewayMetrics("test-feed", lambda: 0, lambda: 0),
        tasks=TaskSet(),
    )
    f.owned = owned if owned is not None else [0, 1]
    return f


def frames(box: Outbox) -> list[dict[str, Any]]:
    return [json.loads(f if isinstance(f, str) else f.render()) for f in box.frames]


def resume(f: TokenFeed, m: RequestMeta, after_seq: int, box: Outbox) -> Resumption:
    return f.resume(m, after_seq, box, slot=f.take_resume_slot(m))


def meta(rid: str, partition: int = 0, offset: int = 5) -> RequestMeta:
    return RequestMeta(rid, "t1", ReplyRoute(TOPIC, partition, offset), 0, "gw-0")


# ---- one deliver for every reader -----------------------------------------------------------


async def test_start_reads_owned_partitions_from_their_end_and_routes_round_robin() -> None:
    f = new_feed()
    await f.start([0, 1])
    assert f.owned_assignment() == {0, 1}
    routes = [f.next_route() for _ in range(3)]
    assert routes == [
        ReplyRoute(TOPIC, 0, 100),
        ReplyRoute(TOPIC, 1, 101),
        ReplyRoute(TOPIC, 0, 100),
    ]


async def test_owned_delivery_counts_events_and_ends_requests_accepted_here() -> None:
    f = new_feed()
    f.inflight.add("r1")
    box = Outbox(100)
    f.follow(Watch("r1", box, tenant_id="t1"))
    f.deliver(
        records([delta("r1", 1), delta("r1", 2), completed("r1", 2)]),
        Source.OWNED,
        f.router.deliver,
    )
    f.deliver(records([delta("r2", 1), completed("r2", 1)]), Source.OWNED, f.router.deliver)
    await asyncio.sleep(0)  # the stream slots are freed by a background task
    assert [x["type"] for x in frames(box)] == ["token", "token", "done"]
    assert f.metrics.token_events == 5
    assert f.metrics.requests == {"length": 1}  # r2 was not accepted here
    assert isinstance(f.quota, FakeQuota) and f.quota.ended == [("t1", "r1")]
    # Every terminal event of an owned partition marks its record (cancels need no write).
    assert isinstance(f.store, FakeStore) and f.store.finished == ["r1", "r2"]
    assert not len(f.inflight) and f.inflight.finished("r1") and f.inflight.finished("r2")
    assert not f.router.watched("r1")


async def test_borrowed_and_catch_up_delivery_count_no_owned_events() -> None:
    f = new_feed()
    box = Outbox(100)
    w = Watch("r1", box, tenant_id="t1")
    f.follow(w)
    f.deliver(records([delta("r1", 1)]), Source.BORROWED, f.router.deliver)

    def into_watch(event: events_pb2.Event) -> int:
        w.apply(event)
        return 1

    f.deliver(records([delta("r1", 2)]), Source.CATCH_UP, into_watch)
    assert [x["seq"] for x in frames(box)] == [1, 2] and f.metrics.token_events == 0


async def test_undecodable_records_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    f = new_feed()
    box = Outbox(100)
    f.follow(Watch("r1", box, tenant_id="t1"))
    bad = [Rec(b"\xff not protobuf", b"r1", 0), Rec(None, b"r1", 1)]
    f.deliver([*bad, *records([delta("r1", 1)], 2)], Source.OWNED, f.router.deliver)
    assert [x["seq"] for x in frames(box)] == [1]
    assert "undecodable record skipped" in caplog.text


# ---- resume: catch-up + live, dedup by seq --------------------------------------------------------


class FakeRange:
    """Stands in for llmstream.kafka's reader / end_offsets / read_range in the catch-up."""

    def __init__(self, log: list[Rec], fail: bool = False) -> None:
        self.log = log
        self.fail = fail
        self.ranges: list[kafka.PartitionRange] = []
        self.stopped = 0

    def reader(self, *_a: Any, **_kw: Any) -> Any:
        outer = self

        class Reader:
            async def start(self) -> None:
                pass

            async def stop(self) -> None:
                outer.stopped += 1

        return Reader()

    async def end_offsets(self, _consumer: Any, tps: Sequence[Any]) -> dict[Any, int]:
        return {tp: len(self.log) for tp in tps}

    async def read_range(
        self, _consumer: Any, ranges: Sequence[kafka.PartitionRange], **_kw: Any
    ) -> AsyncIterator[list[Any]]:
        self.ranges += ranges
        if self.fail:
            raise ConnectionError("broker gone")
        (r,) = ranges
        for i in range(r.start, r.end or 0, 2):  # batches of two records
            yield self.log[i : min(i + 2, r.end or 0)]


@pytest.fixture
def kafka_log(monkeypatch: pytest.MonkeyPatch) -> FakeRange:
    # Another request's records share the partition: the catch-up keeps only its own.
    events = [delta("r1", 1), delta("other", 1), delta("r1", 2), delta("r1", 3), delta("r1", 4)]
    fake = FakeRange(records(events))
    monkeypatch.setattr(kafka, "reader", fake.reader)
    monkeypatch.setattr(kafka, "end_offsets", fake.end_offsets)
    monkeypatch.setattr(kafka, "read_range", fake.read_range)
    return fake


async def test_catch_up_then_parked_live_events_without_gap_or_duplicate(
    kafka_log: FakeRange,
) -> None:
    f = new_feed()
    box = Outbox(100)
    r = resume(f, meta("r1", partition=1, offset=0), 1, box)
    assert r.plan.owned and f.router.watched("r1")
    # Live events 4..6 arrive while the replay (up to 4) has not run yet: parked, not sent.
    live = records([delta("r1", 4), delta("r1", 5), delta("r1", 6)], 10)
    f.deliver(live, Source.OWNED, f.router.deliver)
    assert len(box) == 0
    await f.catch_up(r)
    f.deliver(records([completed("r1", 6)], 13), Source.OWNED, f.router.deliver)
    out = frames(box)
    assert [x["seq"] for x in out if x["type"] == "token"] == [2, 3, 4, 5, 6]
    assert out[-1]["type"] == "done" and not f.router.watched("r1")
    assert kafka_log.ranges == [kafka.PartitionRange(TopicPartition(TOPIC, 1), 0, 5)]
    assert kafka_log.stopped == 1 and f.metrics.resumes["owned"] == 1


async def test_resume_of_another_replicas_request_borrows_its_partition(
    kafka_log: FakeRange,
) -> None:
    f = new_feed(owned=[0, 1])
    r = resume(f, meta("r1", partition=3), 0, Outbox(100))
    await f.catch_up(r)
    assert f.borrowed_assignment() == {3} and f.metrics.resumes["borrowed"] == 1
    assert f.router.borrowed() == {(TOPIC, 3)}  # followed live from the borrowed partition


async def test_failed_borrow_or_replay_drops_the_watch(
    kafka_log: FakeRange,
) -> None:
    f = new_feed()
    f.borrow_reader = FakeReader(fail_seek=True)
    r = resume(f, meta("r1", partition=5), 0, Outbox(100))
    with pytest.raises(GatewayError) as borrow:
        await f.catch_up(r)
    assert (borrow.value.code, borrow.value.request_id) == ("internal", "r1")
    assert borrow.value.retry_after_ms == 1000 and not f.router.watched("r1")
    kafka_log.fail = True
    r = resume(f, meta("r1"), 0, Outbox(100))
    with pytest.raises(GatewayError, match="resume failed"):
        await f.catch_up(r)
    assert not f.router.watched("r1") and kafka_log.stopped == 1


async def test_resumes_beyond_the_bound_are_refused_overloaded() -> None:
    f = new_feed(max_resumes=1)
    slot = f.take_resume_slot(meta("r1"))
    with pytest.raises(GatewayError) as full:
        f.take_resume_slot(meta("r2"))
    assert (full.value.code, full.value.request_id, full.value.retry_after_ms) == (
        "overloaded",
        "r2",
        1000,
    )
    assert f.metrics.resume_refusals["slots"] == 1
    slot.release()
    slot.release()  # idempotent: the catch-up and its task's end both release
    f.take_resume_slot(meta("r2")).release()
    assert f.resume_slots.in_use == 0


async def test_a_catch_up_past_its_deadline_drops_the_watch_and_frees_its_slot(
    kafka_log: FakeRange, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = new_feed()
    monkeypatch.setattr(feed_module, "CATCH_UP_DEADLINE_S", 0.05)
    box = Outbox(2)  # the client reads nothing: the paced replay waits for it
    box.put("x")
    box.put("y")
    r = resume(f, meta("r1", partition=1, offset=0), 0, box)
    with pytest.raises(GatewayError, match=r"resume took longer than 0\.05 s") as late:
        await f.catch_up(r)
    assert (late.value.code, late.value.request_id) == ("overloaded", "r1")
    assert not f.router.watched("r1") and f.resume_slots.in_use == 0
    assert f.metrics.resume_refusals["deadline"] == 1


def test_inflight_counts_running_requests_and_remembers_finished_ones() -> None:
    now = [0.0]
    inflight = Inflight(clock=lambda: now[0])
    inflight.add("a")
    inflight.add("b")
    assert len(inflight) == 2
    assert inflight.finish("a") and not inflight.finish("a")  # counted once
    assert inflight.finished("a") and not inflight.finished("b")
    inflight.discard("b")
    inflight.add("c")
    now[0] = 100.0
    inflight.add("d")
    inflight.expire(50.0)  # c's terminal event never came
    assert set(inflight.running) == {"d"}


# ---- events naming another tenant are never delivered ---------------------------------------


def foreign(ev: events_pb2.Event, tenant: str = "t2") -> events_pb2.Event:
    ev.tenant_id = tenant
    return ev


async def test_live_event_of_another_tenant_is_dropped_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = new_feed()
    box = Outbox(100)
    f.follow(Watch("r1", box, tenant_id="t1"))
    evs = [delta("r1", 1), foreign(delta("r1", 2)), foreign(delta("r1", 2), ""), delta("r1", 2)]
    f.deliver(records(evs), Source.OWNED, f.router.deliver)
    assert [(x["seq"], x["text"]) for x in frames(box)] == [(1, "<1>"), (2, "<2>")]
    assert f.metrics.foreign_events == 2
    assert "event of another tenant dropped" in caplog.text
    # A forged terminal event neither ends the watch nor the request.
    f.deliver(records([foreign(completed("r1", 2))], 4), Source.OWNED, f.router.deliver)
    assert f.router.watched("r1") and f.metrics.foreign_events == 3


async def test_catch_up_drops_events_of_another_tenant(kafka_log: FakeRange) -> None:
    kafka_log.log[:] = records([delta("r1", 1), foreign(delta("r1", 2)), delta("r1", 2)])
    f = new_feed()
    box = Outbox(100)
    r = resume(f, meta("r1", partition=1, offset=0), 0, box)
    await f.catch_up(r)
    assert [(x["seq"], x["text"]) for x in frames(box)] == [(1, "<1>"), (2, "<2>")]
    assert f.metrics.foreign_events == 1


async def test_outcome_labels_are_bounded_whatever_an_event_says() -> None:
    f = new_feed()
    for rid, code in (("r1", "context_overflow"), ("r2", "made-up-" + "x" * 40)):
        f.inflight.add(rid)
        ev = codec.new_event(rid, "t1")
        ev.failed.code = code
        f.deliver(records([ev]), Source.OWNED, f.router.deliver)
    assert f.metrics.requests == {"context_overflow": 1, "other": 1}


async def test_compact_token_events_take_their_request_id_from_the_record_key() -> None:
    f = new_feed()
    box = Outbox(100)
    f.follow(Watch("r1", box, tenant_id="t1"))
    compact = codec.TokenDeltaEncoder(codec.new_event("r1", "t1", "w"), compact=True)
    forged = codec.TokenDeltaEncoder(codec.new_event("r1", "t2", "w"), compact=True)
    values = [compact.value(1, "<1>", [1]), forged.value(2, "FORGED", [2])]
    f.deliver([Rec(v, b"r1", i) for i, v in enumerate(values)], Source.OWNED, f.router.deliver)
    assert [(x["seq"], x["text"]) for x in frames(box)] == [(1, "<1>")]
    assert f.metrics.foreign_events == 1  # the compact shape keeps the tenant id
