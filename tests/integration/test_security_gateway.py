"""Attacks on the gateway from inside and outside, performed against real Kafka, Redis and
PostgreSQL (in-process gateway, the fake worker), each shown refused:

- a session minted by writing Redis (the old plain "key_id tenant_id" value, a value signed
  with another secret, a real session's value copied under another session id) is refused;
- a token event for request R produced into the tokens topic with another tenant's id (and a
  forged terminal event) is not delivered: the client watching R receives R's real tokens
  only, and the drop is counted;
- a cancel flood is rate-limited with a matchable error, and the prompts topic holds one
  cancel per request whatever the number of frames;
- 300 slow resumes from one tenant do not refuse another tenant's resume;
- the page and the API answer with the security headers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from gateway import auth
from gateway.server import Gateway
from llmstream import apikeys, codec, kafka
from llmstream.v1 import common_pb2
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics
from llmstream_tools.testing.model_server import eventually

from .test_gateway_http import ahttp

pytestmark = pytest.mark.integration

topics = testing.topics_fixture(2)


async def refused_upgrade(port: int, cookie: str) -> int:
    with pytest.raises(InvalidStatus) as exc:
        await connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"Cookie": cookie})
    return exc.value.response.status_code


async def test_sessions_minted_by_writing_redis_are_refused(
    topics: Topics,
    db_env: str,
    redis_url: str,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-sec", [0, 1])
    tenant, key = await testing.new_key()
    async with testing.running(s):
        status, hdrs, _ = await ahttp(
            s.port, "/v1/sessions", "POST", {"Authorization": f"Bearer {key}"}
        )
        assert status == 200
        real = hdrs["Set-Cookie"].split(";")[0].split("=", 1)[1]
        real_key = "gw:session:" + hashlib.sha256(real.encode()).hexdigest()
        c = Client(
            await connect(
                f"ws://127.0.0.1:{s.port}/ws",
                additional_headers={"Cookie": f"{auth.SESSION_COOKIE}={real}"},
            )
        )
        await c.wait(lambda: c.hello is not None and c.hello["tenant_id"] == tenant)
        await c.close()
        key_id = apikeys.key_id_of(key)
        assert key_id is not None
        raw: Any = await redis_client.get(real_key)
        real_value = raw.decode()
        assert real_value.startswith(f"{key_id} {tenant} ")
        now_ms = int(time.time() * 1000)
        for what in ("plain", "other secret", "copied"):
            sid = f"forged-{what.replace(' ', '-')}"
            record = "gw:session:" + hashlib.sha256(sid.encode()).hexdigest()
            value = {
                "plain": f"{key_id} {tenant}",  # what a session value used to be
                "other secret": auth.seal_session(
                    b"x" * 32, record, auth.SessionValue(key_id, tenant, now_ms)
                ),
                "copied": real_value,  # valid, but under another session's key
            }[what]
            await redis_client.set(record, value, ex=60)
            assert await refused_upgrade(s.port, f"{auth.SESSION_COOKIE}={sid}") == 401, what
        assert "session refused: its value does not verify" in caplog.text


async def produce_forged(t: Topics, partition: int, events: list[Any]) -> None:
    """Events written straight into the tokens topic by anything that can reach Kafka."""
    # This process's credentials (tests: the admin principal) stand for any that may write
    # the tokens topic: a worker's, stolen, or a broker without authentication.
    producer = AIOKafkaProducer(**kafka.Connection(t.bootstrap).client_kwargs("forger"), acks="all")
    await producer.start()
    try:
        for ev in events:
            await producer.send_and_wait(
                t.tokens, codec.encode(ev), key=codec.key(ev), partition=partition
            )
    finally:
        await producer.stop()


async def test_a_token_event_with_another_tenants_id_is_not_delivered(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-sec", [0, 1])
    _tenant, key = await testing.new_key()
    attacker, _other_key = await testing.new_key()
    async with testing.running(s) as gw, FakeWorker(topics, itl_s=0.3) as worker:
        c = await Client.connect(s.port, key)
        await c.submit("r", max_tokens=4)
        rid = (await c.wait_ref("r"))["request_id"]
        await c.wait(lambda: rid in worker.submitted)
        partition = worker.submitted[rid].submitted.reply.partition
        forged_token = codec.new_event(rid, attacker, "attacker")
        forged_token.token_delta.seq = 2
        forged_token.token_delta.text = "FORGED"
        forged_end = codec.new_event(rid, attacker, "attacker")
        forged_end.completed.finish_reason = common_pb2.FINISH_REASON_STOP
        forged_end.completed.last_seq = 2
        # Written while the real request runs, before its second token.
        await produce_forged(topics, partition, [forged_token, forged_end])
        await c.wait(lambda: c.streams[rid].done is not None, 30)
        st = c.streams[rid]
        assert st.tokens == [(q, testing.token_text(rid, q)) for q in range(1, 5)]
        assert st.done is not None and st.done["finish_reason"] == "length"
        assert gw.parts.metrics.foreign_events == 2
        await c.close()


async def prompt_events(t: Topics) -> list[Any]:
    """Every event in the prompts topic, to its end."""
    consumer = AIOKafkaConsumer(
        **kafka.Connection(t.bootstrap).client_kwargs("counter"), enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t.prompts, p) for p in range(t.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                return out
            batch = await consumer.getmany(timeout_ms=500)
            out += [codec.decode_record(r) for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()


async def pinged(c: Client, data: str) -> None:
    """Every frame sent before this ping was handled (a socket's frames are handled in order)."""
    await c.send({"type": "ping", "data": data})
    await c.wait(lambda: any(f.get("type") == "pong" and f.get("data") == data for f in c.frames))


async def test_a_cancel_flood_is_rate_limited_and_writes_one_cancel_per_request(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-sec", [0, 1])
    _tenant, key = await testing.new_key()
    async with testing.running(s) as gw, FakeWorker(topics, itl_s=0.2) as worker:
        c = await Client.connect(s.port, key)
        for i in range(3):
            await c.submit(f"r{i}", max_tokens=200)
        rids = [(await c.wait_ref(f"r{i}"))["request_id"] for i in range(3)]
        await c.wait(lambda: all(r in worker.submitted for r in rids))
        for i in range(600):
            await c.send({"type": "cancel", "request_id": rids[i % 3], "client_ref": f"c{i}"})
        await pinged(c, "flood")
        limited = [e for e in c.errors if e.get("reason") == "rate_limited"]
        assert limited and len(c.errors) == len(limited)  # nothing else was refused
        assert all(
            e["code"] == "quota_exceeded"
            and e["retry_after_ms"] > 0
            and e["message"] == f"too many cancel frames: retry in {e['retry_after_ms']} ms"
            for e in limited
        )
        assert gw.parts.metrics.rate_limited["cancel"] == len(limited)
        await c.wait(lambda: all(c.streams[r].done is not None for r in rids), 30)
        assert {c.streams[r].done["finish_reason"] for r in rids} == {"cancelled"}  # type: ignore[index]
        # A cancel of an ended request, from another socket: answered from state.
        other = await Client.connect(s.port, key)
        await other.send({"type": "cancel", "request_id": rids[0], "client_ref": "late"})
        await pinged(other, "late")
        assert other.errors == []
        cancels = [e for e in await prompt_events(topics) if e.HasField("cancel_requested")]
        assert sorted(e.request_id for e in cancels) == sorted(rids)  # one per request
        m = gw.parts.metrics.cancels
        # Every cancel let through besides the first of each request wrote nothing: already
        # requested, or (once the worker's `cancelled` was read) the request had ended.
        assert m["written"] == 3 and m["finished"] >= 1
        assert m["duplicate"] + m["finished"] == 600 - len(limited) - 3 + 1
        await c.close()
        await other.close()


@contextlib.asynccontextmanager
async def stalled_socket(port: int, key: str) -> AsyncIterator[ClientConnection]:
    """A socket whose client never reads: once the kernel's buffers are full, what the
    gateway sends it waits in its outbox."""
    ws = await connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {key}"},
        max_queue=1,
        max_size=None,
        compression=None,
    )
    try:
        yield ws
    finally:
        ws.transport.abort()


def conns_of(gw: Gateway, tenant: str) -> list[Any]:
    return [c for c in gw.conns if c.principal.tenant_id == tenant]


async def test_slow_resumes_of_one_tenant_do_not_refuse_another_tenants_resume(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-sec", [0, 1])
    greedy, key = await testing.new_key()
    _other, other_key = await testing.new_key()
    # Tokens of 20 kB: the requests replayed to a socket that does not read fill its kernel
    # buffers, then its outbox: the catch-ups wait for the client, holding their slots.
    async with testing.running(s) as gw, FakeWorker(topics, pad=20_000):
        c = await Client.connect(s.port, key)
        await c.submit("big", max_tokens=1500)
        big = (await c.wait_ref("big"))["request_id"]
        await c.wait(lambda: c.streams[big].done is not None, 120)
        small: list[str] = []
        for batch in range(6):  # 298 small requests, 50 at a time (64 concurrent streams)
            refs = [f"s{batch}-{i}" for i in range(50)][: 298 - len(small)]
            for ref in refs:
                await c.submit(ref, max_tokens=1)
            ids = [(await c.wait_ref(ref, 30))["request_id"] for ref in refs]
            await c.wait(lambda ids=ids: all(c.streams[r].done is not None for r in ids), 60)
            small += ids
        await c.close()
        slots = gw.parts.feed.resume_slots
        async with stalled_socket(s.port, key) as s1, stalled_socket(s.port, key) as s2:
            for ws in (s1, s2):
                await ws.send(json.dumps({"type": "resume", "request_id": big, "after_seq": 0}))
            stalled = conns_of(gw, greedy)
            assert len(stalled) == 2
            await eventually(lambda: all(len(x.outbox) > x.outbox.limit // 2 for x in stalled), 120)
            assert slots.held == {greedy: 2}
            for i, rid in enumerate(small):
                ws = (s1, s2)[i % 2]
                await ws.send(json.dumps({"type": "resume", "request_id": rid, "after_seq": 0}))
            refusals = gw.parts.metrics.resume_refusals
            await eventually(lambda: refusals["slots"] == 300 - slots.per_tenant, 120)
            assert slots.held == {greedy: slots.per_tenant} and slots.per_tenant == 64
            # Another tenant's resume is served, in full, meanwhile.
            b = await Client.connect(s.port, other_key)
            await b.submit("mine", max_tokens=3)
            mine = (await b.wait_ref("mine"))["request_id"]
            await b.wait(lambda: b.streams[mine].done is not None, 30)
            b2 = await Client.connect(s.port, other_key)
            await b2.send({"type": "resume", "request_id": mine, "after_seq": 0})
            await b2.wait(lambda: mine in b2.streams and b2.streams[mine].done is not None, 30)
            assert b2.errors == []
            assert [q for q, _ in b2.streams[mine].tokens] == [1, 2, 3]
            assert slots.held.get(greedy) == slots.per_tenant  # still stalled meanwhile
            await b.close()
            await b2.close()


async def test_page_and_api_responses_carry_the_security_headers(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-sec", [0, 1])
    async with testing.running(s):
        _status, page, _body = await ahttp(s.port, "/")
        csp = page["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp
        assert f"connect-src 'self' ws://127.0.0.1:{s.port} wss://127.0.0.1:{s.port};" in csp
        for path in ("/healthz", "/nope", "/v1/models"):
            _status, hdrs, _body = await ahttp(s.port, path)
            assert hdrs["Content-Security-Policy"] == (
                "default-src 'none'; frame-ancestors 'none'; sandbox"
            ), path
            assert hdrs["X-Content-Type-Options"] == "nosniff", path
            assert hdrs["Referrer-Policy"] == "no-referrer", path
