"""Aggregator on real Kafka + PostgreSQL + Redis: 1,000 synthetic requests are billed exactly
once, priced, rolled up, and their quota reservations settled to actual usage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from aggregator.service import Aggregator, Settings
from llmstream import codec, kafka, quota_keys
from llmstream_tools.testing import synthetic_events as synthetic
from llmstream_tools.testing.aggregator import Topics, new_producer, produce
from llmstream_tools.testing.aggregator import wait_caught_up as caught_up

pytestmark = pytest.mark.integration


async def reserve(client: aioredis.Redis, plans: list[synthetic.RequestPlan], at_ms: int) -> None:
    """What the gateway does at admission (not built yet): add the reservation to the windows."""
    pipe = client.pipeline(transaction=False)
    for p in plans:
        pipe.incrby(quota_keys.tokens_day(p.tenant_id, at_ms), p.reserved_tokens)
        pipe.incrby(quota_keys.tokens_month(p.tenant_id, at_ms), p.reserved_tokens)
        pipe.zadd(quota_keys.streams(p.tenant_id), {p.request_id: at_ms + 60_000})
        # The gateway records each reservation: what its settlement takes back.
        pipe.zadd(quota_keys.reservations(p.tenant_id), {p.request_id: at_ms})
        pipe.hset(quota_keys.reserved(p.tenant_id), p.request_id, p.reserved_tokens)
    await pipe.execute()


async def run_until_caught_up(
    settings: Settings,
    bootstrap: str,
    db: str,
    topics: Topics,
    until: Callable[[Aggregator], bool] | None = None,
) -> Aggregator:
    agg = Aggregator(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agg.run(stop))
    try:
        await caught_up(bootstrap, db, settings.group, topics.both, timeout_s=90)
        for _ in range(100):
            if until is None or until(agg):
                break
            await asyncio.sleep(0.1)
        # Settlement follows the commit; wait until the outbox is drained.
        for _ in range(100):
            async with await psycopg.AsyncConnection.connect(db) as conn:
                cur = await conn.execute("SELECT count(*) FROM quota_outbox")
                row = await cur.fetchone()
            if row is not None and row[0] == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return agg


def settings_for(
    bootstrap: str, db: str, redis_url: str, topics: Topics, group: str | None = None
) -> Settings:
    return Settings(
        bootstrap=bootstrap,
        database_url=db,
        redis_url=redis_url,
        topics=topics.both,
        group=group or f"agg-{uuid.uuid4().hex[:8]}",
        batch_max=500,
        dlq_topic=topics.dlq,
        session_timeout_ms=6000,
    )


async def test_thousand_requests_are_billed_exactly_once(
    kafka_bootstrap: str,
    topics: Topics,
    db: str,
    redis_url: str,
    redis_client: aioredis.Redis,
) -> None:
    run = uuid.uuid4().hex[:8]
    tenants = [f"tn-{run}-{i}" for i in range(4)]
    plans = synthetic.plan(1000, tenants, ["model-a", "model-b"], seed=7)
    plans = [
        synthetic.RequestPlan(**{**p.__dict__, "request_id": f"{run}-{p.request_id}"})
        for p in plans
    ]
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO prices VALUES ('model-a', '2000-01-01', 0.5, 1.5, 'USD'),"
            " ('model-a', '2999-01-01', 99, 99, 'USD')"
        )
    at_ms = codec.event_time_ms(codec.new_event("x", "y"))
    await reserve(redis_client, plans, at_ms)
    producer = await new_producer(kafka_bootstrap)
    try:
        sent = await produce(
            producer, synthetic.interleaved(plans, topics.prompts, topics.tokens, seed=3)
        )
    finally:
        await producer.stop()
    assert sent > 3000

    agg = await run_until_caught_up(
        settings_for(kafka_bootstrap, db, redis_url, topics), kafka_bootstrap, db, topics
    )
    assert agg.totals.events == sent
    assert agg.totals.bad == 0 and agg.totals.offset_gaps == 0

    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT request_id), sum(prompt_tokens),"
            " sum(completion_tokens) FROM usage_ledger"
        )
        count, distinct, prompt, completion = (await cur.fetchone()) or ()
        assert count == distinct == len(plans)
        assert prompt == sum(synthetic.used_tokens(p)[0] for p in plans)
        assert completion == sum(synthetic.used_tokens(p)[1] for p in plans)

        # Prices: model-a priced at the 2000 row (0.5 / 1.5 per 1k); model-b has no price.
        cur = await conn.execute(
            "SELECT model, sum(cost), count(*) FILTER (WHERE cost IS NULL) FROM usage_ledger"
            " GROUP BY model ORDER BY model"
        )
        rows = await cur.fetchall()
        expected_a = sum(
            (
                Decimal(synthetic.used_tokens(p)[0]) * Decimal("0.5") / 1000
                + Decimal(synthetic.used_tokens(p)[1]) * Decimal("1.5") / 1000
                for p in plans
                if p.model == "model-a"
            ),
            Decimal(0),
        )
        assert rows[0][0] == "model-a" and rows[0][1] == expected_a and rows[0][2] == 0
        assert rows[1][0] == "model-b" and rows[1][1] is None
        assert rows[1][2] == sum(1 for p in plans if p.model == "model-b")

        # Rollup equals the ledger.
        cur = await conn.execute(
            "SELECT (SELECT sum(requests) FROM usage_daily), (SELECT sum(prompt_tokens +"
            " completion_tokens) FROM usage_daily), (SELECT sum(total_tokens) FROM usage_ledger)"
        )
        r_requests, r_tokens, l_tokens = (await cur.fetchone()) or ()
        assert r_requests == len(plans) and r_tokens == l_tokens

        # Every request is terminal with its text; statuses follow the plans.
        cur = await conn.execute(
            "SELECT request_id, status, text, billed FROM requests ORDER BY request_id"
        )
        rows = await cur.fetchall()
        by_id = {r[0]: r for r in rows}
        assert len(by_id) == len(plans)
        for p in plans:
            _, status, text, billed = by_id[p.request_id]
            want = {"stop": "completed", "length": "completed"}.get(p.outcome, p.outcome)
            assert status == want and billed
            if not (p.outcome == "failed" and p.n_tokens == 0):
                assert text == "".join(f" t{s}" for s in range(1, p.n_tokens + 1))

        # Redis: reservations replaced by usage, equal to the ledger per tenant.
        cur = await conn.execute(
            "SELECT tenant_id, sum(total_tokens) FROM usage_ledger GROUP BY tenant_id"
        )
        ledger_by_tenant: dict[str, int] = dict(await cur.fetchall())
    for tenant in tenants:
        day = await redis_client.get(quota_keys.tokens_day(tenant, at_ms))
        month = await redis_client.get(quota_keys.tokens_month(tenant, at_ms))
        assert int(day or 0) == int(month or 0) == ledger_by_tenant[tenant]
        assert await redis_client.zcard(quota_keys.streams(tenant)) == 0
        ttl = await redis_client.pttl(quota_keys.tokens_day(tenant, at_ms))
        assert 0 < ttl <= 2 * 86_400_000


async def test_bad_events_are_counted_parked_and_never_billed(
    kafka_bootstrap: str,
    topics: Topics,
    db: str,
    redis_url: str,
    redis_client: aioredis.Redis,
) -> None:
    run = uuid.uuid4().hex[:8]
    plans = synthetic.plan(20, [f"tb-{run}"], ["m"], seed=11)
    plans = [
        synthetic.RequestPlan(**{**p.__dict__, "request_id": f"{run}-{p.request_id}"})
        for p in plans
    ]
    good = list(synthetic.interleaved(plans, topics.prompts, topics.tokens))
    # A terminal event for a request nobody submitted.
    orphan = codec.new_event(f"{run}-orphan", f"tb-{run}", "test")
    orphan.completed.usage.completion_tokens = 5
    # A terminal event claiming another tenant for a known request.
    foreign = codec.new_event(plans[0].request_id, "someone-else", "test")
    foreign.completed.usage.completion_tokens = 1000
    future = codec.new_event(f"{run}-future", f"tb-{run}", "test")
    future.submitted.model = "m"
    future.schema_version = codec.SCHEMA_VERSION + 1
    producer = await new_producer(kafka_bootstrap)
    try:
        half = len(good) // 2
        await produce(producer, good[:half])
        # Raw garbage and an event of an unknown schema version, straight to the topic.
        await producer.send_and_wait(topics.tokens, b"\x00garbage\xff", key=b"x")
        await producer.send_and_wait(
            topics.prompts, future.SerializeToString(), key=future.request_id.encode()
        )
        await produce(
            producer,
            [
                synthetic.Produced(topics.tokens, orphan),
                synthetic.Produced(topics.tokens, foreign),
            ],
        )
        await produce(producer, good[half:])
    finally:
        await producer.stop()

    settings = settings_for(kafka_bootstrap, db, redis_url, topics)
    settings.orphan_grace_s, settings.orphan_check_s = 0.5, 0.2
    agg = await run_until_caught_up(
        settings, kafka_bootstrap, db, topics, until=lambda a: a.totals.bad >= 4
    )
    # garbage, future version, foreign tenant, and the orphan terminal once its grace is over
    assert agg.totals.bad == 4
    assert agg.metrics.parked == 1

    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute("SELECT count(*), sum(completion_tokens) FROM usage_ledger")
        count, completion = (await cur.fetchone()) or ()
        assert count == len(plans)
        assert completion == sum(synthetic.used_tokens(p)[1] for p in plans)
        cur = await conn.execute(
            "SELECT status, billed, submitted_at FROM requests WHERE request_id = %s",
            (f"{run}-orphan",),
        )
        assert await cur.fetchone() == ("completed", False, None)  # parked, not billed

    # Undecodable records are parked on the dead-letter topic with their origin and reason.
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topics.dlq,
        **kafka.Connection(kafka_bootstrap).client_kwargs("test"),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        parked: list[Any] = []
        deadline = asyncio.get_running_loop().time() + 15
        while len(parked) < 2 and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                parked += records
    finally:
        await consumer.stop()
    reasons = sorted(dict(r.headers)["dlq-reason"].decode() for r in parked)
    assert len(reasons) == 2
    assert any("not a protobuf" in r or "schema_version" in r for r in reasons)
    assert any("newer than supported" in r for r in reasons)
    assert all(dict(r.headers)["dlq-source"].startswith(b"test.agg.") for r in parked)
