"""The worker's tier check and dead-letter terminal, pure parts and the guard's outage policy
against an in-memory source (the real PostgreSQL is in tests/integration/test_worker_tiers.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmstream import codec
from llmstream.fold import fold
from llmstream.v1 import events_pb2
from worker.dead_letters import DEAD_LETTERED, dead_letter_terminal, readable_submit
from worker.tier_lookup import TierGuard, TierUnavailable
from worker.tiers import (
    LIMIT_EXCEEDED,
    UNKNOWN_TENANT,
    Freshness,
    TenantTier,
    TierCache,
    check_submit,
    prompt_token_bound,
    retry_delay_s,
)

FREE = TenantTier("t1", disabled=False, tier="free", max_tokens_per_request=512, share=1)


def submit(
    max_tokens: int = 100,
    text: str = "hello there",
    estimate: int | None = None,
    reserved: int | None = None,
    share: int = 0,
    tenant: str = "t1",
) -> events_pb2.Event:
    ev = codec.new_event("r1", tenant, "gw")
    s = ev.submitted
    s.model = "m"
    s.prompt.text = text
    s.max_tokens = max_tokens
    s.estimated_prompt_tokens = len(text) // 4 + 1 if estimate is None else estimate
    s.reserved_tokens = s.estimated_prompt_tokens + max_tokens if reserved is None else reserved
    s.share = share
    s.reply.partition = 1
    return ev


def test_within_the_tier_passes() -> None:
    assert check_submit(submit(max_tokens=512), FREE) is None
    assert check_submit(submit(share=1), FREE) is None


@pytest.mark.parametrize(
    ("event", "tier", "code", "message"),
    [
        (submit(), None, UNKNOWN_TENANT, "tenant 't1' does not exist"),
        (
            submit(),
            TenantTier("t1", True, "free", 512),
            UNKNOWN_TENANT,
            "tenant 't1' is disabled",
        ),
        (
            submit(max_tokens=513),
            FREE,
            LIMIT_EXCEEDED,
            "max_tokens 513 exceeds the free tier's 512",
        ),
        (
            submit(max_tokens=0),
            FREE,
            LIMIT_EXCEEDED,
            "max_tokens unbounded exceeds the free tier's 512",
        ),
        (
            submit(reserved=10**9),
            FREE,
            LIMIT_EXCEEDED,
            "reserved_tokens 1000000000 is not estimated_prompt_tokens 3 + max_tokens 100",
        ),
        (
            submit(text="hi", estimate=10**6),
            FREE,
            LIMIT_EXCEEDED,
            "estimated_prompt_tokens 1000000 exceeds what the prompt can hold (3)",
        ),
        (submit(share=9), FREE, LIMIT_EXCEEDED, "share 9 exceeds the free tier's 1"),
    ],
)
def test_refusals_name_the_limit(
    event: events_pb2.Event, tier: TenantTier | None, code: str, message: str
) -> None:
    refusal = check_submit(event, tier)
    assert refusal is not None
    assert (refusal.code, refusal.message) == (code, message)


def test_prompt_bound_covers_the_gateways_estimate() -> None:
    ev = submit()
    chat = ev.submitted.prompt.chat
    chat.messages.add(role="system", content="be brief")
    chat.messages.add(role="user", content="x" * 40)
    # The gateway: chars (roles and contents) // 4 + 1 + 4 per message.
    gateway_estimate = (6 + 8 + 4 + 40) // 4 + 1 + 4 * 2
    assert prompt_token_bound(ev.submitted) == 6 + 8 + 4 + 40 + 1 + 8 >= gateway_estimate
    ev.submitted.prompt.tokens.ids.extend([1, 2, 3])
    assert prompt_token_bound(ev.submitted) == 4


def test_cache_fresh_stale_lru() -> None:
    cache = TierCache(ttl_s=10, stale_s=100, max_entries=2)
    assert cache.get("t1", 0).freshness is Freshness.NONE
    cache.put("t1", FREE, 0)
    cache.put("gone", None, 0)
    assert cache.get("t1", 9.9).freshness is Freshness.FRESH
    assert cache.get("t1", 50).freshness is Freshness.STALE
    assert cache.get("t1", 50).tier == FREE
    assert cache.get("t1", 100).freshness is Freshness.NONE
    assert cache.get("gone", 5).freshness is Freshness.FRESH  # unknown tenant, while fresh
    assert cache.get("gone", 50).freshness is Freshness.NONE  # never used stale
    assert cache.get("t1", 1).tier == FREE  # "t1" used last: "gone" is the least recent
    cache.put("t3", FREE, 0)
    assert len(cache) == 2
    assert cache.get("gone", 1).freshness is Freshness.NONE
    assert cache.get("t1", 1).freshness is Freshness.FRESH


def test_retry_delay_doubles_to_a_cap() -> None:
    assert [retry_delay_s(n) for n in (1, 2, 3, 6, 20)] == [0.25, 0.5, 1.0, 5.0, 5.0]


class Source:
    """PostgreSQL stand-in: answers from `tiers`, or raises while `down`."""

    def __init__(self) -> None:
        self.tiers = {"t1": FREE}
        self.down = False
        self.calls = 0
        self.called = asyncio.Event()  # set by every call
        self.gate = asyncio.Event()
        self.gate.set()

    async def fetch(self, tenant_id: str) -> TenantTier | None:
        self.calls += 1
        self.called.set()
        await self.gate.wait()
        if self.down:
            raise OSError("connection refused")
        return self.tiers.get(tenant_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_guard_caches_and_merges_lookups() -> None:
    source, clock = Source(), Clock()
    guard = TierGuard(source, TierCache(30, 3600), clock)
    stop = asyncio.Event()
    source.gate.clear()
    many = [asyncio.create_task(guard.tier("t1", clock.now + 60, stop)) for _ in range(5)]
    await asyncio.sleep(0)
    source.gate.set()
    assert await asyncio.gather(*many) == [FREE] * 5
    assert source.calls == 1  # one query for five concurrent lookups
    assert await guard.tier("t1", clock.now + 60, stop) == FREE
    assert await guard.tier("nobody", clock.now + 60, stop) is None
    assert source.calls == 2


async def test_guard_uses_a_stale_tier_while_postgres_is_down() -> None:
    source, clock = Source(), Clock()
    guard = TierGuard(source, TierCache(30, 3600), clock)
    stop = asyncio.Event()
    assert await guard.tier("t1", clock.now + 60, stop) == FREE
    source.down = True
    clock.now += 600  # stale, not expired
    assert await guard.tier("t1", clock.now + 60, stop) == FREE
    clock.now += 3600  # beyond the stale bound: nothing usable, and no time left to wait
    with pytest.raises(
        TierUnavailable, match=r"PostgreSQL did not answer \(OSError: connection refused\)"
    ):
        await guard.tier("t1", clock.now + 0.1, stop)


async def test_guard_waits_for_postgres_then_answers() -> None:
    source = Source()
    guard = TierGuard(source, TierCache(30, 3600))  # real clock: the waits are real (0.25 s)
    source.down = True
    stop = asyncio.Event()
    waiting = asyncio.create_task(guard.tier("t1", time.monotonic() + 3600, stop))
    for _ in range(2):  # failed twice: it waits and asks again
        await asyncio.wait_for(source.called.wait(), 10)
        source.called.clear()
    assert not waiting.done()
    source.down = False
    assert await asyncio.wait_for(waiting, 10) == FREE


async def test_guard_wait_ends_when_stopped() -> None:
    source = Source()
    source.down = True
    guard = TierGuard(source, TierCache(30, 3600))
    stop = asyncio.Event()
    waiting = asyncio.create_task(guard.tier("t1", float("inf"), stop))
    await asyncio.wait_for(source.called.wait(), 10)
    stop.set()
    with pytest.raises(TierUnavailable, match="stopped while waiting"):
        await asyncio.wait_for(waiting, 10)


def test_dead_letter_terminal_for_a_readable_submit() -> None:
    ev = submit()
    ev.schema_version = 99  # a newer gateway: decode refused it, but it still names its request
    value = ev.SerializeToString()
    out = dead_letter_terminal(
        b"r1",
        value,
        "schema_version 99 is newer",
        tokens_partitions=3,
        producer_id="w",
        generation=7,
    )
    assert out is not None
    assert out.partition == 1
    e = out.event
    assert (e.request_id, e.tenant_id, e.producer_id) == ("r1", "t1", "w")
    assert (e.failed.code, e.failed.message) == (
        DEAD_LETTERED,
        "the request could not be processed: schema_version 99 is newer",
    )
    assert (e.failed.usage.prompt_tokens, e.failed.usage.completion_tokens, e.failed.last_seq) == (
        0,
        0,
        0,
    )
    assert (e.fence.generation, e.fence.attempt) == (7, 0)
    state = fold(None, e)
    assert state.terminal and state.error_code == DEAD_LETTERED
    assert codec.decode(codec.encode(e)) == e


def test_dead_letter_terminal_only_when_someone_waits() -> None:
    ev = submit()
    value = ev.SerializeToString()
    args = {"reason": "x", "tokens_partitions": 3, "producer_id": "w", "generation": 1}
    assert dead_letter_terminal(b"r1", b"\xff\xfe garbage", **args) is None  # type: ignore[arg-type]
    assert dead_letter_terminal(b"other", value, **args) is None  # type: ignore[arg-type]
    ev.submitted.reply.partition = 3
    assert dead_letter_terminal(b"r1", ev.SerializeToString(), **args) is None  # type: ignore[arg-type]
    no_tenant = submit(tenant="")
    assert readable_submit(b"r1", no_tenant.SerializeToString()) is None
    cancel = codec.new_event("r1", "t1")
    cancel.cancel_requested.reason = "client"
    assert readable_submit(b"r1", cancel.SerializeToString()) is None  # another body kind
    assert readable_submit(None, value) is not None  # no key: the body names it
    assert readable_submit(b"r1", None) is None
