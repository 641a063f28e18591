"""Quota reservations never leak and never go negative, against real Kafka, Redis and
PostgreSQL (an in-process gateway with the fake worker; the aggregator's reaper and settler):

- a prompt the producer refuses before taking it (too large for Kafka): surely not written,
  so the reservation is released: the tenant's counters are back to zero;
- a write whose acknowledgement does not come in time: the outcome is unknown, so the
  reservation, the request's record and its idempotency key stay; the client is told so, the
  request runs (the record was delivered after all), and a retry with the same idempotency
  key is answered with the same request and its full text;
- a reservation whose submit never reached the log is reaped by the aggregator after its
  bound; one whose request is in the log is not;
- a settlement takes back what the gateway recorded, whatever `reserved_tokens` the terminal
  request's events claim: a forged huge value cannot drive a counter negative.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from aggregator.metrics import AggregatorMetrics
from aggregator.quota_settlement import QuotaSettler, rebuild_from_postgres
from aggregator.reservation_reaper import ReservationReaper
from aggregator.store import Settlement
from gateway import prompts
from gateway.quota import Limits, Quota
from llmstream import quota_keys
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration

topics = testing.topics_fixture(2)
LIMITS = Limits("standard", 600, 5_000_000, 100_000_000, 64, 2048, 256)


async def counters(redis: aioredis.Redis, tenant: str, at_ms: int) -> dict[str, int]:
    """Everything a reservation of `tenant` touches in the windows of `at_ms`."""
    day = await redis.get(quota_keys.tokens_day(tenant, at_ms))
    month = await redis.get(quota_keys.tokens_month(tenant, at_ms))
    return {
        "day": int(day or 0),
        "month": int(month or 0),
        "streams": await redis.zcard(quota_keys.streams(tenant)),
        "reservations": await redis.zcard(quota_keys.reservations(tenant)),
        "reserved": await redis.hlen(quota_keys.reserved(tenant)),
    }


ZERO = {"day": 0, "month": 0, "streams": 0, "reservations": 0, "reserved": 0}


async def test_a_prompt_refused_before_the_write_releases_its_reservation(
    topics: Topics, db_env: str, redis_url: str, redis_client: aioredis.Redis
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-res", [0, 1])
    tenant, key = await testing.new_key()
    async with testing.running(s) as gw, FakeWorker(topics) as worker:
        c = await Client.connect(s.port, key)
        await c.submit("ok", max_tokens=3)
        rid = (await c.wait_ref("ok"))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None, 30)
        at_ms = int(time.time() * 1000)
        before = await counters(redis_client, tenant, at_ms)
        # The fault, between the reservation and the write: the gateway's producer is closed,
        # so it refuses the record before taking it (ProducerClosed): surely not written.
        await gw.parts.resources.producer.stop()
        await c.submit("lost", max_tokens=5, idempotency_key="k-lost")
        await c.wait(lambda: any(e.get("client_ref") == "lost" for e in c.errors), 30)
        err = next(e for e in c.errors if e.get("client_ref") == "lost")
        assert (err["code"], err["message"], err["retry_after_ms"]) == (
            "internal",
            "could not queue the request",
            1000,
        )
        # Back to where it was: nothing reserved, recorded, counted or claimed for it.
        assert await counters(redis_client, tenant, at_ms) == before
        assert await redis_client.hget(quota_keys.reserved(tenant), err["request_id"]) is None
        assert await gw.parts.store.lookup(tenant, err["request_id"]) is None
        idem = await redis_client.keys(f"gw:idem:{{{tenant}}}:*")
        assert idem == [], idem
        assert list(worker.submitted) == [rid]
        await c.close()


async def test_an_unknown_write_outcome_keeps_the_reservation_and_a_retry_follows_it(
    topics: Topics,
    db_env: str,
    redis_url: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gateway does not wait for Kafka's acknowledgement at all: the producer has the
    # record and delivers it anyway, as it did in the chaos run's 61 s outage.
    monkeypatch.setattr(prompts, "SEND_TIMEOUT_S", 0.0)
    s = testing.settings(topics, redis_url, db_env, "gw-unk", [0, 1])
    tenant, key = await testing.new_key()
    async with testing.running(s), FakeWorker(topics) as worker:
        c = await Client.connect(s.port, key)
        at_ms = int(time.time() * 1000)
        await c.submit("first", max_tokens=6, idempotency_key="k-unknown")
        await c.wait(lambda: any(e.get("client_ref") == "first" for e in c.errors), 30)
        err = next(e for e in c.errors if e.get("client_ref") == "first")
        rid = err["request_id"]
        assert (err["code"], err["reason"], err["retry_after_ms"]) == (
            "internal",
            "outcome_unknown",
            1000,
        )
        assert err["message"].startswith("outcome unknown: Kafka did not confirm the request")
        # Kept: the reservation (counted and recorded: the aggregator settles it once the
        # request ends, or reaps it if it never reaches the log) and the idempotency key.
        kept = await counters(redis_client, tenant, at_ms)
        assert kept["reservations"] == kept["reserved"] == 1
        assert kept["day"] == kept["month"] > 0
        # The record was delivered after all: the worker runs the request.
        await c.wait(lambda: rid in worker.submitted, 30)
        # The retry with the same key is answered with the same request, which it follows.
        await c.submit("retry", max_tokens=6, idempotency_key="k-unknown")
        again = await c.wait_ref("retry")
        assert (again["type"], again["request_id"], again["existing"]) == ("accepted", rid, True)
        await c.wait(lambda: rid in c.streams and c.streams[rid].done is not None, 30)
        st = c.streams[rid]
        assert st.text == "".join(testing.token_text(rid, q) for q in range(1, 7))
        assert st.done is not None and st.done["finish_reason"] == "length"
        assert list(worker.submitted) == [rid]  # one request, written once
        after = await counters(redis_client, tenant, at_ms)
        assert (after["reservations"], after["reserved"], after["day"]) == (1, 1, kept["day"])
        await c.close()


async def test_the_reaper_takes_back_only_reservations_whose_request_never_reached_the_log(
    db_env: str, redis_client: aioredis.Redis
) -> None:
    tenant, _key = await testing.new_key()
    quota = Quota(redis_client)
    now = int(time.time() * 1000)
    old = now - 20 * 60_000  # older than the reaper's bound (10 min here)
    lost, logged, young = (f"req_{uuid.uuid4().hex}" for _ in range(3))
    # Reserved as the gateway does; `lost` never got its submit written (the gateway died, or
    # its producer gave up), `logged` did (the aggregator projected it), `young` is recent.
    for rid, at in ((lost, old), (logged, old), (young, now)):
        assert (await quota.reserve(tenant, rid, at, now, 300, LIMITS)).ok
    with psycopg.connect(db_env, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO requests (request_id, tenant_id, model, status) VALUES (%s, %s, 'm', "
            "'running')",
            (logged, tenant),
        )
    reader = InMemoryMetricReader()
    metrics = AggregatorMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    reaper = ReservationReaper(redis_client, sql.Identifier("requests"), 600.0, metrics)
    before = await counters(redis_client, tenant, old)
    async with AsyncConnectionPool(db_env, min_size=1, max_size=1, open=False) as pool:
        # One pass covers every tenant of the shared Redis: reservations other tests left
        # behind (their requests are in other schemas' logs) are old enough too, so this
        # tenant's share is judged through its own keys below, the totals through the metrics.
        reaped = await reaper.maybe_reap(pool, force=True)  # the aggregator's call
        assert reaped.requests >= 1 and reaped.tokens >= 300
        again = await reaper.maybe_reap(pool, force=True)  # once only
        assert (again.requests, again.tokens) == (0, 0)
    assert counter_values(reader) == {
        "llmstream_aggregator_reaped_reservations": reaped.requests,
        "llmstream_aggregator_reaped_reservation_tokens": reaped.tokens,
    }
    after = await counters(redis_client, tenant, old)
    assert after["day"] == before["day"] - 300
    assert await redis_client.zscore(quota_keys.reservations(tenant), lost) is None
    assert await redis_client.zscore(quota_keys.streams(tenant), lost) is None
    for kept in (logged, young):
        assert await redis_client.hget(quota_keys.reserved(tenant), kept) == b"300"


def counter_values(reader: InMemoryMetricReader) -> dict[str, int]:
    """The reaper's counters as the aggregator exports them."""
    data: Any = reader.get_metrics_data()
    out: dict[str, int] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name.startswith("llmstream_aggregator_reaped"):
                    out[m.name] = int(sum(p.value for p in m.data.data_points))
    return out


async def test_a_rebuild_records_unfinished_reservations_clamped_to_the_tier(
    db_env: str, redis_client: aioredis.Redis
) -> None:
    tenant, _key = await testing.new_key("free")  # tokens_per_day 50,000
    now = int(time.time() * 1000)
    forged, fair = f"req_{uuid.uuid4().hex}", f"req_{uuid.uuid4().hex}"
    with psycopg.connect(db_env, autocommit=True) as conn:
        for rid, reserved in ((forged, 10**12), (fair, 700)):
            conn.execute(
                "INSERT INTO requests (request_id, tenant_id, model, status, submitted_at,"
                " reserved_tokens) VALUES (%s, %s, 'm', 'running', now(), %s)",
                (rid, tenant, reserved),
            )
    async with await psycopg.AsyncConnection.connect(db_env, autocommit=True) as conn:
        await rebuild_from_postgres(
            conn,
            QuotaSettler(redis_client),
            sql.Identifier("requests"),
            sql.Identifier("quota_outbox"),
            now,
        )
    # The forged reservation counts the tier's daily bound at most: no negative, no lock-out
    # beyond what a real reservation could do; both are recorded for their settlement.
    assert (await counters(redis_client, tenant, now))["day"] == 50_000 + 700
    recorded: Any = await redis_client.hgetall(quota_keys.reserved(tenant))
    assert recorded == {forged.encode(): b"50000", fair.encode(): b"700"}
    assert await redis_client.zcard(quota_keys.reservations(tenant)) == 2


async def test_settlement_takes_back_the_recorded_reservation_not_the_events_claim(
    redis_client: aioredis.Redis,
) -> None:
    tenant = f"tr{uuid.uuid4().hex[:8]}"
    quota, settler = Quota(redis_client), QuotaSettler(redis_client)
    now = int(time.time() * 1000)
    assert (await quota.reserve(tenant, "r1", now, now, 400, LIMITS)).ok
    # The terminal request's events claim a reservation of 10^12 tokens (forged), used 37.
    forged = Settlement("r1", tenant, now, reserved_tokens=10**12, used_tokens=37)
    assert await settler.settle([forged]) == 1
    assert await settler.settle([forged]) == 0  # idempotent
    assert await counters(redis_client, tenant, now) == {**ZERO, "day": 37, "month": 37}
    # A request nobody reserved for (its reservation reaped, or a forged submit): its usage is
    # added, nothing taken back.
    stray = Settlement("r2", tenant, now, reserved_tokens=10**12, used_tokens=5)
    assert await settler.settle([stray]) == 1
    assert (await counters(redis_client, tenant, now))["day"] == 42
    # A release after the settlement takes nothing back either.
    assert not await quota.release(tenant, "r1", now)
    assert (await counters(redis_client, tenant, now))["day"] == 42
