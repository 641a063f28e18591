"""Two gateway replicas with split tokens partitions, real Kafka/Redis/PostgreSQL, fake worker:
routing, resume across replicas, tenancy, quota, idempotency, grace cancel, slow readers."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from aggregator.quota_settlement import QuotaSettler
from aggregator.store import Settlement
from gateway.settings import Settings
from llmstream import quota_keys
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration


topics = testing.topics_fixture(4)
new_key = testing.new_key


def pair(t: Topics, redis_url: str, db: str, **kw: Any) -> tuple[Settings, Settings]:
    return (
        testing.settings(t, redis_url, db, "gw-a", [0, 1], **kw),
        testing.settings(t, redis_url, db, "gw-b", [2, 3], **kw),
    )


async def test_many_requests_over_two_replicas(topics: Topics, db_env: str, redis_url: str) -> None:
    sa, sb = pair(topics, redis_url, db_env)
    tenant, key = await new_key("enterprise")
    sockets, per_socket, n_tokens = 50, 10, 6
    async with testing.running(sa) as a, testing.running(sb) as b, FakeWorker(topics) as w:
        assert a.consumer_assignment() == {0, 1}
        assert b.consumer_assignment() == {2, 3}
        clients = [
            await Client.connect((sa if i % 2 == 0 else sb).port, key) for i in range(sockets)
        ]
        t0 = time.monotonic()
        for c in clients:
            for j in range(per_socket):
                await c.submit(f"s{j}", max_tokens=n_tokens)
        for c in clients:
            await c.wait(lambda c=c: sum(1 for s in c.streams.values() if s.done) == per_socket, 60)
        elapsed = time.monotonic() - t0
        for i, c in enumerate(clients):
            owned = {0, 1} if i % 2 == 0 else {2, 3}
            rids = {c.by_ref[f"s{j}"]["request_id"] for j in range(per_socket)}
            assert set(c.streams) == rids  # nothing of other sockets
            for rid in rids:
                st = c.streams[rid]
                assert [q for q, _ in st.tokens] == list(range(1, n_tokens + 1))
                assert st.text == "".join(
                    testing.token_text(rid, q) for q in range(1, n_tokens + 1)
                )
                assert w.submitted[rid].submitted.reply.partition in owned
                assert w.submitted[rid].tenant_id == tenant
        print(f"{sockets * per_socket} requests over {sockets} sockets in {elapsed:.2f}s")
        # Each replica consumed only its own partitions.
        assert a.consumer_assignment() == {0, 1} and b.consumer_assignment() == {2, 3}
        for c in clients:
            await c.close()


async def test_resume_on_other_replica_mid_stream_and_after_completion(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    sa, sb = pair(topics, redis_url, db_env)
    _tenant, key = await new_key()
    _other_tenant, other_key = await new_key()
    n = 30
    async with testing.running(sa), testing.running(sb) as b, FakeWorker(topics, itl_s=0.03):
        c1 = await Client.connect(sa.port, key)
        await c1.submit("x", max_tokens=n)
        rid = (await c1.wait_ref("x"))["request_id"]
        await c1.wait(lambda: len(c1.streams[rid].tokens) >= 5)
        await c1.close()
        seen = list(c1.streams[rid].tokens)
        after = seen[-1][0]
        # Resume on the replica that does not own the reply partition.
        c2 = await Client.connect(sb.port, key)
        await c2.send({"type": "resume", "request_id": rid, "after_seq": after})
        await c2.wait(lambda: rid in c2.streams and c2.streams[rid].done is not None, 15)
        rest = c2.streams[rid].tokens
        assert [q for q, _ in rest] == list(range(after + 1, n + 1))
        # B read A's partition only for the resumed request, with its second consumer; its
        # own consumer never changed, and the borrowed partition is given back afterwards.
        assert b.consumer_assignment() == {2, 3}
        for _ in range(60):
            if not b.borrowed_partitions():
                break
            await asyncio.sleep(0.05)
        assert b.borrowed_partitions() == set()
        full = "".join(t for _, t in seen + rest)
        assert full == "".join(testing.token_text(rid, q) for q in range(1, n + 1))
        # After completion, on the owning replica: full replay from 0 (live path).
        c3 = await Client.connect(sa.port, key)
        await c3.send({"type": "resume", "request_id": rid, "after_seq": 0})
        await c3.wait(lambda: rid in c3.streams and c3.streams[rid].done is not None)
        assert c3.streams[rid].text == full
        assert c3.streams[rid].done == c2.streams[rid].done
        # Another tenant: not_found for resume and cancel, 404 over HTTP.
        c4 = await Client.connect(sb.port, other_key)
        await c4.send({"type": "resume", "request_id": rid, "after_seq": 0})
        await c4.send({"type": "cancel", "request_id": rid})
        await c4.wait(lambda: len(c4.errors) == 2)
        assert [e["code"] for e in c4.errors] == ["not_found", "not_found"]
        assert rid not in c4.streams
        for c in (c2, c3, c4):
            await c.close()


async def test_resume_on_owner_mid_stream_is_gapless(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    sa, _sb = pair(topics, redis_url, db_env)
    _tenant, key = await new_key()
    n = 40
    async with testing.running(sa), FakeWorker(topics, itl_s=0.02):
        c1 = await Client.connect(sa.port, key)
        await c1.submit("x", max_tokens=n)
        rid = (await c1.wait_ref("x"))["request_id"]
        await c1.wait(lambda: len(c1.streams[rid].tokens) >= 3)
        # A second socket joins mid-stream from seq 1 while the first keeps watching.
        c2 = await Client.connect(sa.port, key)
        await c2.send({"type": "resume", "request_id": rid, "after_seq": 1})
        for c in (c1, c2):
            await c.wait(lambda c=c: rid in c.streams and c.streams[rid].done is not None, 15)
        assert [q for q, _ in c1.streams[rid].tokens] == list(range(1, n + 1))
        assert [q for q, _ in c2.streams[rid].tokens] == list(range(2, n + 1))
        await c1.close()
        await c2.close()


async def test_quota_refusal_and_settlement(
    topics: Topics, db_env: str, redis_url: str, redis_client: aioredis.Redis
) -> None:
    tier = f"tiny{uuid.uuid4().hex[:6]}"
    with psycopg.connect(db_env, autocommit=True) as conn:
        conn.execute("INSERT INTO quota_tiers VALUES (%s, 2, 100000, 1000000, 10, 64, 4)", (tier,))
    tenant, key = await new_key(tier)
    s = testing.settings(topics, redis_url, db_env, "gw-a", [0, 1, 2, 3])
    async with testing.running(s), FakeWorker(topics):
        c = await Client.connect(s.port, key)
        await c.submit("a", max_tokens=1000)  # capped to the tier's 64
        acc = await c.wait_ref("a")
        assert acc["type"] == "accepted" and acc["max_tokens"] == 64
        assert acc["max_tokens_capped"] == "tier"
        await c.submit("b", max_tokens=5)
        await c.wait_ref("b")
        await c.submit("c", max_tokens=5)
        refused = await c.wait_ref("c")
        assert refused["type"] == "error" and refused["code"] == "quota_exceeded"
        assert 0 < refused["retry_after_ms"] <= 60_000
        assert "requests_per_minute" in refused["message"]
        rid_a, rid_b = c.by_ref["a"]["request_id"], c.by_ref["b"]["request_id"]
        await c.wait(lambda: all(c.streams[r].done for r in (rid_a, rid_b)))
        meta = await redis_client.hgetall(f"gw:req:{rid_a}")
        at = int(meta[b"submitted_ms"])
        day = int(await redis_client.get(quota_keys.tokens_day(tenant, at)) or 0)
        dones: list[dict[str, Any]] = []
        for r in (rid_a, rid_b):
            d = c.streams[r].done
            assert d is not None
            dones.append(d)
        prompt = [int(d["usage"]["prompt_tokens"]) for d in dones]
        used = [
            p + int(d["usage"]["completion_tokens"]) for p, d in zip(prompt, dones, strict=True)
        ]
        assert day == prompt[0] + 64 + prompt[1] + 5
        # The gateway frees the stream slots as soon as it sees the terminal events.
        for _ in range(50):
            if await redis_client.zcard(quota_keys.streams(tenant)) == 0:
                break
            await asyncio.sleep(0.05)
        assert await redis_client.zcard(quota_keys.streams(tenant)) == 0
        # The aggregator's settlement replaces the reservations by usage (same key layout).
        settler = QuotaSettler(redis_client)
        await settler.settle(
            [
                Settlement(rid_a, tenant, at, prompt[0] + 64, used[0]),
                Settlement(rid_b, tenant, at, prompt[1] + 5, used[1]),
            ]
        )
        assert int(await redis_client.get(quota_keys.tokens_day(tenant, at)) or 0) == sum(used)
        assert await redis_client.zcard(quota_keys.streams(tenant)) == 0
        await c.close()


async def test_idempotent_resubmit_returns_same_request(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    sa, sb = pair(topics, redis_url, db_env)
    _tenant, key = await new_key()
    async with testing.running(sa), testing.running(sb), FakeWorker(topics) as w:
        c1 = await Client.connect(sa.port, key)
        await c1.submit("one", max_tokens=4, idempotency_key="order-42")
        rid = (await c1.wait_ref("one"))["request_id"]
        await c1.wait(lambda: c1.streams[rid].done is not None)
        c2 = await Client.connect(sb.port, key)
        await c2.submit("two", max_tokens=4, idempotency_key="order-42")
        again = await c2.wait_ref("two")
        assert again["request_id"] == rid and again["existing"] is True
        await c2.wait(lambda: rid in c2.streams and c2.streams[rid].done is not None)
        assert c2.streams[rid].text == c1.streams[rid].text
        assert list(w.submitted) == [rid]
        # Racing resubmits on both replicas: still one request.
        await asyncio.gather(
            c1.submit("r1", max_tokens=4, idempotency_key="order-43"),
            c2.submit("r2", max_tokens=4, idempotency_key="order-43"),
        )
        r1, r2 = await c1.wait_ref("r1"), await c2.wait_ref("r2")
        assert r1["type"] == r2["type"] == "accepted"
        assert r1["request_id"] == r2["request_id"]
        raced = r1["request_id"]
        for c in (c1, c2):
            await c.wait(lambda c=c: raced in c.streams and c.streams[raced].done is not None)
        assert list(w.submitted) == [rid, raced]
        await c1.close()
        await c2.close()


async def test_disconnect_grace_then_cancel_unless_resumed(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    sa, sb = pair(topics, redis_url, db_env, grace_s=0.6)
    _tenant, key = await new_key()
    async with testing.running(sa), testing.running(sb), FakeWorker(topics, itl_s=0.05) as w:
        c = await Client.connect(sa.port, key)
        await c.submit("gone", max_tokens=200)
        await c.submit("back", max_tokens=60)
        await c.submit("shared", max_tokens=60)
        gone = (await c.wait_ref("gone"))["request_id"]
        back = (await c.wait_ref("back"))["request_id"]
        shared = (await c.wait_ref("shared"))["request_id"]
        # `shared` is also followed by a socket on the other replica before the first drops.
        cb = await Client.connect(sb.port, key)
        await cb.send({"type": "resume", "request_id": shared, "after_seq": 0})
        await cb.wait(lambda: shared in cb.streams and len(cb.streams[shared].tokens) >= 2)
        await c.wait(lambda: len(c.streams[back].tokens) >= 2)
        await c.close()
        c2 = await Client.connect(sb.port, key)
        await c2.send({"type": "resume", "request_id": back, "after_seq": 0})
        await c2.wait(lambda: gone in w.cancels, 10)
        assert w.cancels[gone] == "disconnect"
        await c2.wait(lambda: back in c2.streams and c2.streams[back].done is not None, 15)
        await cb.wait(lambda: cb.streams[shared].done is not None, 15)
        assert back not in w.cancels and shared not in w.cancels
        for cl, rid in ((c2, back), (cb, shared)):
            done = cl.streams[rid].done
            assert done is not None and done["finish_reason"] == "length"
        await c2.close()
        await cb.close()


async def test_stalled_reader_is_bounded_and_closed(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-a", [0, 1, 2, 3], send_buffer=64)
    _tenant, key = await new_key("enterprise")
    async with testing.running(s) as gw, FakeWorker(topics, pad=4000, batch=50):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        ws = await connect(
            f"ws://127.0.0.1:{s.port}/ws",
            sock=sock,
            additional_headers={"Authorization": f"Bearer {key}"},
            max_queue=1,
            max_size=None,
        )
        await ws.send(
            '{"type":"submit","model":"m","prompt":"p","max_tokens":3000,"client_ref":"big"}'
        )
        # Never read: the gateway must close the socket (4008) with its queue within bounds.
        conn = next(iter(gw.conns))
        deadline = time.monotonic() + 20
        while gw.metrics.send_buffer_overflows < 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert gw.metrics.send_buffer_overflows == 1
        for _ in range(100):
            if not gw.conns:
                break
            await asyncio.sleep(0.05)
        assert not gw.conns
        assert conn.outbox.high_water <= 64 and len(conn.outbox) == 0
        ws.transport.abort()
        # The request itself is fine: a fresh socket resumes it to the end.
        c = await Client.connect(s.port, key)
        rid = next(iter(await _rids(gw)))
        await c.send({"type": "resume", "request_id": rid, "after_seq": 0})
        await c.wait(lambda: rid in c.streams and c.streams[rid].done is not None, 30)
        assert [q for q, _ in c.streams[rid].tokens] == list(range(1, 3001))
        await c.close()


async def _rids(gw: testing.Gateway) -> set[str]:
    return set(gw.inflight.running) | set(gw.inflight.recent)


async def test_resume_after_owner_replica_dies(topics: Topics, db_env: str, redis_url: str) -> None:
    sa, sb = pair(topics, redis_url, db_env)
    _tenant, key = await new_key()
    n = 40
    async with testing.running(sb), FakeWorker(topics, itl_s=0.03):
        a = testing.Gateway(sa)
        await a.start()
        try:
            c1 = await Client.connect(sa.port, key)
            await c1.submit("x", max_tokens=n)
            rid = (await c1.wait_ref("x"))["request_id"]
            await c1.wait(lambda: len(c1.streams[rid].tokens) >= 3)
        finally:
            await a.stop()  # the owner of the reply partition is gone (no drain)
        await c1.wait(lambda: c1.close_code is not None)
        seen = c1.streams[rid].tokens
        c2 = await Client.connect(sb.port, key)
        await c2.send({"type": "resume", "request_id": rid, "after_seq": seen[-1][0]})
        await c2.wait(lambda: rid in c2.streams and c2.streams[rid].done is not None, 15)
        got = seen + c2.streams[rid].tokens
        assert [q for q, _ in got] == list(range(1, n + 1))
        await c2.close()


async def test_tenant_socket_cap_spans_replicas(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    tier = f"socks{uuid.uuid4().hex[:6]}"
    with psycopg.connect(db_env, autocommit=True) as conn:
        conn.execute("INSERT INTO quota_tiers VALUES (%s, 10, 1000, 10000, 2, 64, 2)", (tier,))
    _tenant, key = await new_key(tier)
    sa, sb = pair(topics, redis_url, db_env)
    async with testing.running(sa), testing.running(sb):
        c1 = await Client.connect(sa.port, key)
        c2 = await Client.connect(sb.port, key)
        for port in (sa.port, sb.port):
            with pytest.raises(InvalidStatus) as exc:
                await Client.connect(port, key)
            assert exc.value.response.status_code == 429
        await c1.close()
        for _ in range(50):
            await asyncio.sleep(0.05)
            try:
                c3 = await Client.connect(sb.port, key)
                break
            except InvalidStatus as refused:  # still full: only the cap may refuse it
                assert refused.response.status_code == 429
        else:
            raise AssertionError("socket slot not freed")
        for c in (c2, c3):
            await c.close()


async def test_drain_then_everyone_resumes_on_the_other_replica(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    """SIGTERM-style drain of A mid-stream: its sockets get 1012, reconnect to B and resume
    all their requests; every stream ends complete, without gap or duplicate, uncancelled."""
    sa, sb = pair(topics, redis_url, db_env, grace_s=0.5, drain_s=3)
    _tenant, key = await new_key("enterprise")
    n = 50
    async with testing.running(sb) as b, FakeWorker(topics, itl_s=0.02) as w:
        a = testing.Gateway(sa)
        await a.start()
        try:
            clients = [await Client.connect(sa.port, key) for _ in range(10)]
            for c in clients:
                for j in range(5):
                    await c.submit(f"s{j}", max_tokens=n)
            for c in clients:
                await c.wait(lambda c=c: len(c.streams) == 5)
                await c.wait(lambda c=c: all(len(s.tokens) >= 2 for s in c.streams.values()))
            await a.drain()
        finally:
            await a.stop()
        assert all(c.close_code == 1012 for c in clients)
        again = [await Client.connect(sb.port, key) for _ in clients]
        for old, new in zip(clients, again, strict=True):
            for rid, st in old.streams.items():
                after = st.tokens[-1][0] if st.tokens else 0
                await new.send({"type": "resume", "request_id": rid, "after_seq": after})
        for old, new in zip(clients, again, strict=True):
            await new.wait(
                lambda new=new: (
                    len(new.streams) == 5 and all(s.done is not None for s in new.streams.values())
                ),
                30,
            )
            for rid, st in old.streams.items():
                got = st.tokens + new.streams[rid].tokens
                assert [q for q, _ in got] == list(range(1, n + 1))
                done = new.streams[rid].done
                assert done is not None and done["finish_reason"] == "length"
        assert not w.cancels
        assert b.consumer_assignment() == {2, 3}
        for c in again:
            await c.close()
