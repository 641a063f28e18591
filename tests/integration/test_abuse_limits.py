"""Limits under abuse, against real processes (`local_stack`: synthetic model server with a
2,048-token context, worker, aggregator, gateway):

- a prompt longer than the model's context ends with `done` error `context_overflow`;
- max_tokens above the tenant tier's limit is capped to it (and the generation obeys the cap);
- 10,000 submits as fast as one client can send them from one tenant: the tenant's rate limit
  holds exactly, every submit is answered, nothing leaks, and another tenant's requests
  stream meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from llmstream import config, quota_keys
from llmstream_tools import stack
from llmstream_tools.testing.gateway import Client

pytestmark = pytest.mark.integration

FLOOD = 10_000
SOCKETS = 4
STANDARD_RPM = 600  # quota_tiers: standard
FREE_MAX_TOKENS = 512  # quota_tiers: free


@pytest_asyncio.fixture(scope="module")
async def st(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[stack.Stack]:
    async with stack.local_stack(tmp_path_factory.mktemp("limits"), workers=1, itl_ms=1) as s:
        yield s


async def test_prompt_longer_than_the_context_fails_with_context_overflow(
    st: stack.Stack,
) -> None:
    _tenant, key = await st.tenant_key("standard")
    c = await Client.connect(st.gateway_port, key)
    long_chat = [{"role": "user", "content": "w" * 1500}, {"role": "user", "content": "v" * 1500}]
    await c.submit("text", max_tokens=8, prompt="x" * 5000)  # 5,000 tokens > 2,048
    await c.submit("chat", max_tokens=8, prompt=None, messages=long_chat)
    await c.submit("fits", max_tokens=8, prompt="x" * 1000)
    rids = {ref: (await c.wait_ref(ref, 20))["request_id"] for ref in ("text", "chat", "fits")}
    await c.wait(lambda: all(c.streams[r].done is not None for r in rids.values()), 30)
    for ref in ("text", "chat"):
        s = c.streams[rids[ref]]
        assert s.done is not None and s.tokens == []
        assert s.done["finish_reason"] == "error", s.done
        assert s.done["error_code"] == "context_overflow"
        assert "context" in s.done["message"] and "Traceback" not in s.done["message"]
    fits = c.streams[rids["fits"]].done
    assert fits is not None and fits["finish_reason"] == "length"
    await c.close()


async def test_max_tokens_above_the_tier_limit_is_capped(st: stack.Stack) -> None:
    _tenant, key = await st.tenant_key("free")
    c = await Client.connect(st.gateway_port, key)
    await c.submit("big", max_tokens=100_000)
    accepted = await c.wait_ref("big", 20)
    assert accepted["type"] == "accepted", accepted
    assert accepted["max_tokens"] == FREE_MAX_TOKENS and accepted["max_tokens_capped"] == "tier"
    rid = accepted["request_id"]
    await c.wait(lambda: c.streams[rid].done is not None, 60)
    done = c.streams[rid].done
    assert done is not None and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == FREE_MAX_TOKENS  # the worker got the cap
    await c.submit("huge", max_tokens=1_000_001)  # beyond the protocol's bound: refused
    refused = await c.wait_ref("huge")
    assert refused["code"] == "invalid_request" and refused["field"] == "max_tokens"
    await c.close()


async def answered(c: Client, n: int) -> None:
    await c.wait(lambda: len(c.by_ref) >= n, 120)


async def all_done(c: Client, request_ids: list[str]) -> None:
    await c.wait(lambda: all(c.streams[r].done is not None for r in request_ids), 60)


async def test_a_flood_from_one_tenant_is_rate_limited_and_others_stream(
    st: stack.Stack,
) -> None:
    flooder, key = await st.tenant_key("standard")
    _other, other_key = await st.tenant_key("standard")
    sockets = [await Client.connect(st.gateway_port, key) for _ in range(SOCKETS)]
    bystander = await Client.connect(st.gateway_port, other_key)
    prompt = "flood"
    frames = [
        json.dumps(
            {"type": "submit", "client_ref": f"f{i}", "model": "synthetic", "prompt": prompt,
             "max_tokens": 1}
        )
        for i in range(FLOOD)
    ]  # fmt: skip

    async def flood(c: Client, part: list[str]) -> None:
        for frame in part:
            await c.ws.send(frame)

    async def other_tenant() -> list[float]:
        """Requests of another tenant during the flood: accept latency of each."""
        latencies = []
        for i in range(5):
            t0 = time.monotonic()
            await bystander.submit(f"o{i}", max_tokens=20)
            assert (await bystander.wait_ref(f"o{i}", 30))["type"] == "accepted"
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(0.2)
        return latencies

    t0, start_ms = time.monotonic(), int(time.time() * 1000)
    others = asyncio.create_task(other_tenant())
    await asyncio.gather(
        *(flood(c, frames[i::SOCKETS]) for i, c in enumerate(sockets)),
    )
    sent_s = time.monotonic() - t0
    for i, c in enumerate(sockets):
        await answered(c, len(frames[i::SOCKETS]))
    answered_s, end_ms = time.monotonic() - t0, int(time.time() * 1000)
    answers = [a for c in sockets for a in c.by_ref.values()]
    accepted = [a for a in answers if a["type"] == "accepted"]
    refused = [a for a in answers if a["type"] == "error"]
    assert len(answers) == FLOOD and len(accepted) + len(refused) == FLOOD
    # The limit holds: never more than the tier's 600 requests in a minute window (a fixed
    # window per wall-clock minute: a flood across a minute boundary gets two), and the tenant
    # got close to it (the cap of 64 concurrent streams may refuse some more).
    redis = aioredis.from_url(config.redis_url())
    windows = sorted(
        {quota_keys.requests_minute(flooder, ms) for ms in [*range(start_ms, end_ms, 1000), end_ms]}
    )
    counted = [int(await redis.get(w) or 0) for w in windows]
    assert all(n <= STANDARD_RPM for n in counted), counted
    assert sum(counted) == len(accepted)
    assert STANDARD_RPM // 2 <= len(accepted) <= STANDARD_RPM * len(windows)
    limits = {e["message"] for e in refused}
    assert limits <= {
        "quota exceeded: requests_per_minute",
        "quota exceeded: concurrent_streams",
    }, limits
    assert all(e["code"] == "quota_exceeded" and e["retry_after_ms"] > 0 for e in refused)
    # Every socket is still open; the other tenant was served throughout.
    assert all(c.close_code is None for c in sockets)
    latencies = await others
    rids = [bystander.by_ref[f"o{i}"]["request_id"] for i in range(5)]
    await bystander.wait(lambda: all(bystander.streams[r].done is not None for r in rids), 60)
    for r in rids:
        done = bystander.streams[r].done
        assert done is not None and done["usage"]["completion_tokens"] == 20
    # The flooder's accepted requests all finish; its stream slots drain to none.
    accepted_ids = [a["request_id"] for a in accepted]
    for c in sockets:
        await all_done(c, [r for r in accepted_ids if r in c.streams])
    try:
        for _ in range(100):
            if await redis.zcard(quota_keys.streams(flooder)) == 0:
                break
            await asyncio.sleep(0.1)
        assert await redis.zcard(quota_keys.streams(flooder)) == 0
    finally:
        await redis.aclose()
    print(
        f"flood: {FLOOD} submits sent in {sent_s:.2f}s ({FLOOD / sent_s:.0f}/s), all answered"
        f" after {answered_s:.2f}s; accepted {len(accepted)} in {len(windows)} minute window(s),"
        f" refused {len(refused)};"
        f" other tenant's accept latency max {max(latencies) * 1000:.0f} ms"
    )
    for c in [*sockets, bystander]:
        await c.close()
