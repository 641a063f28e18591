"""Quota reservation Lua against real Redis: atomic under concurrency, retry_after, release."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.quota import Limits, Quota
from llmstream import quota_keys

pytestmark = pytest.mark.integration


async def test_concurrent_reservations_never_exceed_limits(redis_client: aioredis.Redis) -> None:
    q = Quota(redis_client)
    tenant = f"tq{uuid.uuid4().hex[:8]}"
    now = int(time.time() * 1000)
    limits = Limits("x", 1000, 10_000, 100_000, 5, 100, 10)
    results = await asyncio.gather(
        *(q.reserve(tenant, f"r{i}", now, now, 100, limits) for i in range(50))
    )
    ok = [r for r in results if r.ok]
    assert len(ok) == 5
    assert {r.limit for r in results if not r.ok} == {"concurrent_streams"}
    assert int(await redis_client.get(quota_keys.tokens_day(tenant, now)) or 0) == 500
    # Releasing one frees a stream slot and its tokens.
    first_ok = next(i for i, r in enumerate(results) if r.ok)
    assert await q.release(tenant, f"r{first_ok}", now)
    assert not await q.release(tenant, f"r{first_ok}", now)  # once only
    assert int(await redis_client.get(quota_keys.tokens_day(tenant, now)) or 0) == 400
    assert (await q.reserve(tenant, "again", now, now, 100, limits)).ok


async def test_token_and_rate_limits_say_how_long_to_wait(redis_client: aioredis.Redis) -> None:
    q = Quota(redis_client)
    tenant = f"tq{uuid.uuid4().hex[:8]}"
    now = int(time.time() * 1000)
    day = Limits("x", 1000, 250, 100_000, 100, 100, 10)
    assert (await q.reserve(tenant, "a", now, now, 200, day)).ok
    refused = await q.reserve(tenant, "b", now, now, 100, day)
    assert not refused.ok and refused.limit == "tokens_per_day"
    assert refused.retry_after_ms == quota_keys.day_end_ms(now) - now
    rpm = Limits("x", 1, 10**9, 10**9, 100, 100, 10)
    t2 = f"tq{uuid.uuid4().hex[:8]}"
    assert (await q.reserve(t2, "a", now, now, 1, rpm)).ok
    refused = await q.reserve(t2, "b", now, now, 1, rpm)
    assert refused.limit == "requests_per_minute"
    assert 0 < refused.retry_after_ms <= 60_000
    # Expired stream leases are dropped before counting.
    streams = Limits("x", 1000, 10**9, 10**9, 1, 100, 10)
    t3 = f"tq{uuid.uuid4().hex[:8]}"
    assert (await q.reserve(t3, "a", now, now, 1, streams, lease_ms=10)).ok
    assert not (await q.reserve(t3, "b", now, now + 5, 1, streams)).ok
    assert (await q.reserve(t3, "b", now, now + 50, 1, streams)).ok
