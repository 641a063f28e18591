"""Tenant isolation and credential lifetime at the gateway (real Kafka/Redis/PostgreSQL, fake
worker), over WebSocket and HTTP:

- tenant B cannot cancel, resume, read the status of, or receive tokens of tenant A's request,
  nor reach it through A's idempotency key;
- a revoked key, a disabled tenant, a signed-out session and an expired session are refused
  on the next action of an already open socket (not only at connect), and on HTTP;
- cross-origin upgrades and sign-ins are refused; the session cookie is HttpOnly,
  SameSite=Strict, and Secure when configured (test_tls.py: automatically under TLS).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from llmstream_tools import admin
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    t = await testing.create_topics(kafka_bootstrap, partitions=2)
    yield t
    await testing.delete_topics(t)


def _http(
    port: int, path: str, method: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            status, hdrs, body = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, body = exc.code, dict(exc.headers), exc.read()
    return status, hdrs, json.loads(body)


async def http(
    port: int, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], Any]:
    return await asyncio.to_thread(_http, port, path, method, headers)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def sign_in(port: int, key: str, origin: str | None = None) -> str:
    """POST /v1/sessions; the `llmstream_session=...` pair of the cookie."""
    headers = {"Authorization": f"Bearer {key}"}
    if origin:
        headers["Origin"] = origin
    status, hdrs, _ = await http(port, "/v1/sessions", "POST", **headers)
    assert status == 200, status
    return hdrs["Set-Cookie"].split(";")[0]


async def cookie_socket(port: int, session: str, origin: str | None = None) -> Client:
    headers = {"Cookie": session}
    if origin:
        headers["Origin"] = origin
    c = Client(await connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers))
    await c.wait(lambda: c.hello is not None)
    return c


async def refused_everything(c: Client, rid: str, tag: str) -> None:
    await c.send({"type": "cancel", "request_id": rid, "client_ref": f"c{tag}"})
    await c.send({"type": "resume", "request_id": rid, "client_ref": f"r{tag}"})
    await c.send({"type": "resume", "request_id": rid, "after_seq": 2})
    for ref in (f"c{tag}", f"r{tag}"):
        answer = await c.wait_ref(ref)
        assert answer["type"] == "error" and answer["code"] == "not_found", answer
    await c.wait(lambda: len(c.errors) == 3)
    assert all(e["code"] == "not_found" and e["request_id"] == rid for e in c.errors)


async def test_another_tenant_cannot_touch_a_request(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-iso", [0, 1])
    _ta, _na, key_a = await testing.new_tenant()
    _tb, _nb, key_b = await testing.new_tenant()
    async with testing.running(s), FakeWorker(topics, itl_s=0.02) as worker:
        a = await Client.connect(s.port, key_a)
        b = await Client.connect(s.port, key_b)
        b_session = await sign_in(s.port, key_b)
        b_cookie = await cookie_socket(s.port, b_session)
        await a.submit("a", max_tokens=60, idempotency_key="shared-key")
        rid = (await a.wait_ref("a"))["request_id"]
        await a.wait(lambda: len(a.streams[rid].tokens) >= 3)
        # While A's request streams: B's cancel and resume of it are `not_found`, on a bearer
        # socket and on a session-cookie socket alike.
        for i, c in enumerate((b, b_cookie)):
            await refused_everything(c, rid, str(i))
        # B submitting with A's idempotency key gets a request of its own.
        await b.submit("b", max_tokens=2, idempotency_key="shared-key")
        mine = await b.wait_ref("b")
        assert mine["type"] == "accepted" and mine["request_id"] != rid
        assert "existing" not in mine
        # Status over HTTP: A sees it; B (bearer or cookie) and nobody get a 404 / 401.
        assert (await http(s.port, f"/v1/requests/{rid}", **bearer(key_a)))[0] == 200
        for headers in (bearer(key_b), {"Cookie": b_session}):
            status, _h, body = await http(s.port, f"/v1/requests/{rid}", **headers)
            assert status == 404 and body == {"error": "not_found", "message": "no such request"}
        assert (await http(s.port, f"/v1/requests/{rid}"))[0] == 401
        await a.wait(lambda: a.streams[rid].done is not None, 15)
        # A's request was never cancelled and streamed whole.
        done = a.streams[rid].done
        assert done is not None and done["finish_reason"] == "length"
        assert [q for q, _ in a.streams[rid].tokens] == list(range(1, 61))
        assert rid not in worker.cancels
        # After the end too: B's resume is `not_found`; B never saw a frame of A's request.
        await b.send({"type": "resume", "request_id": rid, "client_ref": "late"})
        assert (await b.wait_ref("late"))["code"] == "not_found"
        await b.wait(lambda: b.streams[mine["request_id"]].done is not None)
        for c in (b, b_cookie):
            leaked = [f for f in c.frames if rid in json.dumps(f) and f["type"] != "error"]
            assert leaked == []
            assert all(f.get("request_id") in (rid, None) for f in c.errors)
        for c in (a, b, b_cookie):
            await c.close()


async def expect_refused(c: Client, frame: dict[str, Any]) -> dict[str, Any]:
    """The next action is refused `unauthorized` and the socket closed with 4401."""
    before = len(c.errors)
    await c.send(frame)
    await c.wait(lambda: len(c.errors) > before)
    err = c.errors[before]
    assert err["code"] == "unauthorized", err
    await c.wait(lambda: c.close_code is not None)
    assert c.close_code == 4401
    assert not any(f["type"] == "accepted" for f in c.frames[-3:])
    return err


async def test_revoked_disabled_and_ended_credentials_are_refused_on_the_next_action(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-iso", [0, 1], session_ttl_s=3)
    _t1, _n1, revoked = await testing.new_tenant()
    t2, _n2, disabled = await testing.new_tenant()
    _t3, _n3, key3 = await testing.new_tenant()
    async with testing.running(s), FakeWorker(topics):
        # Sockets opened while everything was valid, each used once.
        s1 = await Client.connect(s.port, revoked)
        s2 = await Client.connect(s.port, disabled)
        signed_out = await sign_in(s.port, key3)
        idle, active = await sign_in(s.port, key3), await sign_in(s.port, key3)
        s3 = await cookie_socket(s.port, signed_out)
        s4 = await cookie_socket(s.port, idle)
        s5 = await cookie_socket(s.port, active)
        for i, c in enumerate((s1, s2, s3, s4, s5)):
            await c.submit(f"ok{i}", max_tokens=2)
            assert (await c.wait_ref(f"ok{i}"))["type"] == "accepted"
        rid2 = s2.by_ref["ok1"]["request_id"]
        # Revoke a key, disable a tenant, sign a session out.
        await admin.revoke_key(revoked)
        with psycopg.connect(db_env, autocommit=True) as conn:
            conn.execute("UPDATE tenants SET disabled_at = now() WHERE id = %s", (t2,))
        status, hdrs, _ = await http(s.port, "/v1/sessions", "DELETE", Cookie=signed_out)
        assert status == 200 and "Max-Age=0" in hdrs["Set-Cookie"]
        # The idle session expires (TTL 3 s) while the active one slides on every use.
        for i in range(4):
            await asyncio.sleep(1.0)
            await s5.submit(f"slide{i}", max_tokens=1)
            assert (await s5.wait_ref(f"slide{i}"))["type"] == "accepted"
        err = await expect_refused(
            s1, {"type": "submit", "model": "m", "prompt": "p", "max_tokens": 1}
        )
        assert err["message"] == "API key revoked or expired"
        await expect_refused(s2, {"type": "resume", "request_id": rid2})
        for c in (s3, s4):
            err = await expect_refused(c, {"type": "cancel", "request_id": "req_x"})
            assert err["message"] == "session expired or signed out"
        # HTTP and new upgrades are refused as well; the live session still works.
        for headers in (
            bearer(revoked),
            bearer(disabled),
            {"Cookie": signed_out},
            {"Cookie": idle},
        ):
            assert (await http(s.port, f"/v1/requests/{rid2}", **headers))[0] == 401
            with pytest.raises(InvalidStatus) as exc:
                await connect(f"ws://127.0.0.1:{s.port}/ws", additional_headers=headers)
            assert exc.value.response.status_code == 401
        for key in (revoked, disabled):
            assert (await http(s.port, "/v1/sessions", "POST", **bearer(key)))[0] == 401
        await s5.submit("still", max_tokens=1)
        assert (await s5.wait_ref("still"))["type"] == "accepted"
        await s5.close()


async def test_cross_origin_is_refused_and_the_cookie_is_locked_down(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    app = "https://app.example"
    s = testing.settings(topics, redis_url, db_env, "gw-iso", [0, 1], origins=[app])
    _t, _n, key = await testing.new_tenant()
    async with testing.running(s):
        # Signing in from another origin is refused; from the app it sets a locked cookie.
        for origin in ("https://evil.example", "null", f"http://127.0.0.1:{s.port}"):
            status, _h, body = await http(
                s.port, "/v1/sessions", "POST", Origin=origin, **bearer(key)
            )
            assert status == 403 and body["error"] == "forbidden", origin
        status, hdrs, _ = await http(s.port, "/v1/sessions", "POST", Origin=app, **bearer(key))
        assert status == 200
        attributes = [a.strip() for a in hdrs["Set-Cookie"].split(";")]
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
        assert "Secure" not in attributes  # plain http, LLMSTREAM_GATEWAY_COOKIE_SECURE=0
        session = attributes[0]
        # A cross-origin upgrade is refused before any WebSocket exists, cookie or key.
        for headers in (
            {"Cookie": session, "Origin": "https://evil.example"},
            {"Cookie": session, "Origin": "https://app.example.evil.example"},
            {"Authorization": f"Bearer {key}", "Origin": "https://evil.example"},
        ):
            with pytest.raises(InvalidStatus) as exc:
                await connect(f"ws://127.0.0.1:{s.port}/ws", additional_headers=headers)
            assert exc.value.response.status_code == 403
        c = await cookie_socket(s.port, session, origin=app)
        await c.close()
    secure = testing.settings(topics, redis_url, db_env, "gw-iso", [0, 1], cookie_secure=True)
    async with testing.running(secure):
        status, hdrs, _ = await http(secure.port, "/v1/sessions", "POST", **bearer(key))
        assert status == 200 and "Secure" in [a.strip() for a in hdrs["Set-Cookie"].split(";")]


async def test_an_expired_key_is_refused_on_the_next_action(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    """A key made with an expiry (`llmstream keys create --expires-in`) works until then and
    is refused on the next action after it — on its own socket and on sessions made from it
    — although the gateway still holds the key's row in its cache."""
    s = testing.settings(topics, redis_url, db_env, "gw-iso", [0, 1])
    _t, name, _key = await testing.new_tenant()
    key = (await admin.create_key(name, expires_in_s=3)).key
    assert await admin.key_is_active(key)
    async with testing.running(s), FakeWorker(topics):
        c = await Client.connect(s.port, key)
        session = await sign_in(s.port, key)
        cs = await cookie_socket(s.port, session)
        for i, client in enumerate((c, cs)):
            await client.submit(f"before{i}", max_tokens=1)
            assert (await client.wait_ref(f"before{i}"))["type"] == "accepted"
        rid = c.by_ref["before0"]["request_id"]
        assert (await http(s.port, f"/v1/requests/{rid}", **bearer(key)))[0] == 200
        await asyncio.sleep(3.2)
        assert not await admin.key_is_active(key)
        err = await expect_refused(
            c, {"type": "submit", "model": "m", "prompt": "p", "max_tokens": 1}
        )
        assert err["message"] == "API key revoked or expired"
        await expect_refused(cs, {"type": "resume", "request_id": rid})
        for headers in (bearer(key), {"Cookie": session}):
            assert (await http(s.port, f"/v1/requests/{rid}", **headers))[0] == 401
            with pytest.raises(InvalidStatus) as exc:
                await connect(f"ws://127.0.0.1:{s.port}/ws", additional_headers=headers)
            assert exc.value.response.status_code == 401
        assert (await http(s.port, "/v1/sessions", "POST", **bearer(key)))[0] == 401
