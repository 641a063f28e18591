"""Exactly-once mechanics on real servers: the offsets fence, idempotent Redis settlement, quota
rebuild from PostgreSQL, and a consumer-group rebalance under traffic."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from aggregator.projection import Coords
from aggregator.quota_settlement import QuotaSettler, rebuild_from_postgres
from aggregator.service import Aggregator, Settings
from aggregator.store import Batch, Fenced, ProjectionStore, Settlement
from llmstream import codec, quota_keys
from llmstream_tools.testing import synthetic_events as synthetic
from llmstream_tools.testing.aggregator import (
    Topics,
    fresh_topics,
    new_producer,
    produce,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


def batch_of(
    plans: list[synthetic.RequestPlan], first_offset: int = 0, topic: str = "log"
) -> Batch:
    """All events of the plans as one partition's records (offsets from `first_offset`)."""
    batch = Batch()
    offset = first_offset
    for plan in plans:
        for item in synthetic.events_of(plan, "p", "t"):
            coords = Coords(topic, 0, offset, 0)
            batch.consumed(coords)
            batch.events.append((coords, item.event))
            offset += 1
    return batch


async def ledger_count(db: str) -> int:
    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute("SELECT count(*) FROM usage_ledger")
        row = await cur.fetchone()
    return int(row[0]) if row else -1


async def test_offsets_fence_a_second_writer_of_the_same_records(db: str) -> None:
    run = uuid.uuid4().hex[:6]
    plans = synthetic.plan(5, [f"tf-{run}"], ["m"], seed=1)
    batch = batch_of(plans)
    store = ProjectionStore("g")
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        outcome = await store.apply_batch(conn, batch)
        assert len(outcome.ledger) == 5 and len(outcome.settlements) == 5
        with pytest.raises(Fenced, match="stored"):
            await store.apply_batch(conn, batch)
        assert await ledger_count(db) == 5
        assert await store.load_offsets(conn, [("log", 0)]) == {
            ("log", 0): batch.next_offsets[("log", 0)]
        }
        # A gap (transaction markers, compaction) is not a conflict.
        later = batch_of(synthetic.plan(2, [f"tf-{run}"], ["m"], seed=2), first_offset=10_000)
        assert len((await store.apply_batch(conn, later)).ledger) == 2
        assert (await store.apply_batch(conn, later_bad(run))).bad[0].reason == "tenant_missing"
        cur = await conn.execute("SELECT count(*) FROM requests WHERE request_id LIKE 'nobody-%'")
        assert (await cur.fetchone() or (None,))[0] == 0  # no row for a refused event


def later_bad(run: str) -> Batch:
    event = codec.new_event(f"nobody-{run}", "", "test")
    event.completed.usage.completion_tokens = 3
    batch = Batch()
    coords = Coords("log", 0, 20_000, 0)
    batch.consumed(coords)
    batch.events.append((coords, event))
    return batch


async def test_two_writers_racing_on_the_same_batch_bill_once(db: str) -> None:
    run = uuid.uuid4().hex[:6]
    batch = batch_of(synthetic.plan(50, [f"tr-{run}"], ["m"], seed=3), topic="race")
    store = ProjectionStore("g")

    async def attempt() -> str:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            try:
                await store.apply_batch(conn, batch)
                return "ok"
            except Fenced:
                return "fenced"

    results = await asyncio.gather(*(attempt() for _ in range(4)))
    assert sorted(results) == ["fenced", "fenced", "fenced", "ok"]
    assert await ledger_count(db) == 50


async def test_settlement_is_idempotent(redis_client: aioredis.Redis) -> None:
    tenant = f"ts-{uuid.uuid4().hex[:6]}"
    at = codec.event_time_ms(codec.new_event("x", "y"))
    day, month = quota_keys.tokens_day(tenant, at), quota_keys.tokens_month(tenant, at)
    await redis_client.set(day, 100)
    await redis_client.set(month, 1000)
    await redis_client.zadd(quota_keys.streams(tenant), {"r1": at + 60_000})
    # The gateway's record of the reservation: what the settlement takes back.
    await redis_client.zadd(quota_keys.reservations(tenant), {"r1": at})
    await redis_client.hset(quota_keys.reserved(tenant), "r1", 40)
    settler = QuotaSettler(redis_client)
    s = Settlement("r1", tenant, at, reserved_tokens=40, used_tokens=15)
    assert await settler.settle([s]) == 1
    assert await settler.settle([s, s]) == 0
    assert int(await redis_client.get(day) or 0) == 75
    assert int(await redis_client.get(month) or 0) == 975
    assert await redis_client.zcard(quota_keys.streams(tenant)) == 0
    assert 0 < await redis_client.pttl(quota_keys.settled(tenant, at)) <= 2 * 86_400_000


async def test_quota_rebuild_from_postgres(db: str, redis_client: aioredis.Redis) -> None:
    tenant = f"tq-{uuid.uuid4().hex[:6]}"
    done = synthetic.plan(6, [tenant], ["m"], seed=5)
    running = [
        synthetic.RequestPlan(f"{tenant}-run-{i}", tenant, "m", 0, 5, 25, "stop") for i in range(3)
    ]
    batch = batch_of(done)
    for i, plan in enumerate(running):  # only the submit: still in flight
        coords = Coords("log", 0, 1000 + i, 0)
        batch.consumed(coords)
        batch.events.append((coords, synthetic.events_of(plan, "p", "t")[0].event))
    store = ProjectionStore("g")
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        outcome = await store.apply_batch(conn, batch)
        assert len(outcome.settlements) == 6  # still pending in the outbox: Redis "lost"
        settler = QuotaSettler(redis_client)
        now = codec.event_time_ms(codec.new_event("x", "y"))
        summary = await rebuild_from_postgres(
            conn, settler, store.t("requests"), store.t("quota_outbox"), now
        )
        cur = await conn.execute("SELECT count(*) FROM quota_outbox")
        assert (await cur.fetchone() or (None,))[0] == 0
    used = sum(sum(synthetic.used_tokens(p)) for p in done)
    reserved = sum(p.reserved_tokens for p in running)
    assert summary["pending_marked"] == 6 and summary["streams"] == 3
    assert int(await redis_client.get(quota_keys.tokens_day(tenant, now)) or 0) == used + reserved
    assert int(await redis_client.get(quota_keys.tokens_month(tenant, now)) or 0) == used + reserved
    assert int(await redis_client.get(quota_keys.requests_minute(tenant, now)) or 0) in (0, 9)
    members: list[Any] = list(await redis_client.zrange(quota_keys.streams(tenant), 0, -1))
    assert sorted(m.decode() for m in members) == [p.request_id for p in running]
    # The outbox's settlements were already counted: replaying them changes nothing.
    assert await settler.settle(outcome.settlements) == 0


async def test_rebalance_between_two_aggregators_under_traffic(
    kafka_bootstrap: str, db: str, redis_url: str
) -> None:
    run = uuid.uuid4().hex[:6]
    plans = [
        synthetic.RequestPlan(**{**p.__dict__, "request_id": f"{run}-{p.request_id}"})
        for p in synthetic.plan(600, [f"tg-{run}"], ["m"], seed=8)
    ]
    events = list(synthetic.interleaved(plans, "P", "T"))
    group = f"agg-pair-{run}"
    async with fresh_topics(kafka_bootstrap) as topics:
        items = [
            synthetic.Produced(topics.prompts if e.topic == "P" else topics.tokens, e.event)
            for e in events
        ]

        def make() -> tuple[Aggregator, asyncio.Event, asyncio.Task[Any]]:
            agg = Aggregator(settings(kafka_bootstrap, db, redis_url, topics, group))
            stop = asyncio.Event()
            return agg, stop, asyncio.create_task(agg.run(stop))

        producer = await new_producer(kafka_bootstrap)
        a, stop_a, task_a = make()
        b = None
        try:
            third = len(items) // 3
            await produce(producer, items[:third])
            await asyncio.sleep(1.0)
            b, stop_b, task_b = make()  # joins: partitions are split
            await produce(producer, items[third : 2 * third])
            await asyncio.sleep(2.0)
            stop_a.set()  # leaves: B takes everything
            await asyncio.wait_for(task_a, 30)
            await produce(producer, items[2 * third :])
            await wait_caught_up(kafka_bootstrap, db, group, topics.both, timeout_s=60)
        finally:
            await producer.stop()
            stop_a.set()
            if b is not None:
                stop_b.set()
                await asyncio.wait_for(task_b, 30)
            await asyncio.wait_for(task_a, 30)
    assert a.totals.events > 0 and b is not None and b.totals.events > 0
    assert a.totals.events + b.totals.events >= len(items)
    assert a.totals.offset_gaps == b.totals.offset_gaps == 0
    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT request_id), sum(completion_tokens)"
            " FROM usage_ledger WHERE tenant_id = %s",
            (f"tg-{run}",),
        )
        count, distinct, completion = (await cur.fetchone()) or ()
    assert count == distinct == len(plans)
    assert completion == sum(synthetic.used_tokens(p)[1] for p in plans)


def settings(bootstrap: str, db: str, redis_url: str, topics: Topics, group: str) -> Settings:
    return Settings(
        bootstrap=bootstrap,
        database_url=db,
        redis_url=redis_url,
        topics=topics.both,
        group=group,
        batch_max=200,
        session_timeout_ms=6000,
    )


async def test_redis_outage_defers_settlement_without_blocking_billing(
    kafka_bootstrap: str, db: str, redis_url: str, redis_client: aioredis.Redis
) -> None:
    run = uuid.uuid4().hex[:6]
    tenant = f"to-{run}"
    plans = [
        synthetic.RequestPlan(**{**p.__dict__, "request_id": f"{run}-{p.request_id}"})
        for p in synthetic.plan(40, [tenant], ["m"], seed=9)
    ]
    group = f"agg-outage-{run}"
    async with fresh_topics(kafka_bootstrap) as topics:
        producer = await new_producer(kafka_bootstrap)
        try:
            await produce(producer, synthetic.interleaved(plans, topics.prompts, topics.tokens))
        finally:
            await producer.stop()
        # Redis unreachable: bills are written, settlements wait in the outbox.
        down = settings(kafka_bootstrap, db, "redis://127.0.0.1:9/0", topics, group)
        agg = Aggregator(down)
        stop = asyncio.Event()
        task = asyncio.create_task(agg.run(stop))
        try:
            await wait_caught_up(kafka_bootstrap, db, group, topics.both)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        assert await ledger_count(db) == 40
        async with await psycopg.AsyncConnection.connect(db) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM quota_outbox WHERE tenant_id = %s", (tenant,)
            )
            assert (await cur.fetchone() or (None,))[0] == 40
        # Redis is back: the next start settles the outbox, once.
        agg = Aggregator(settings(kafka_bootstrap, db, redis_url, topics, group))
        stop = asyncio.Event()
        task = asyncio.create_task(agg.run(stop))
        try:
            for _ in range(100):
                async with await psycopg.AsyncConnection.connect(db) as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FROM quota_outbox WHERE tenant_id = %s", (tenant,)
                    )
                    if (await cur.fetchone() or (None,))[0] == 0:
                        break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    at = codec.event_time_ms(codec.new_event("x", "y"))
    used = sum(sum(synthetic.used_tokens(p)) for p in plans)
    # Nobody reserved in this test (no reservation recorded): a settlement takes nothing back
    # (never the events' reserved_tokens), so the counter holds the usage, applied exactly once.
    assert int(await redis_client.get(quota_keys.tokens_day(tenant, at)) or 0) == used
