"""Gateway HTTP routes, auth on upgrade (bearer, session cookie, Origin), revocation, drain."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.server import Gateway, Parts
from llmstream.ports import free_port
from llmstream_tools import admin
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration


topics = testing.topics_fixture(2)


def http(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
            status, hdrs = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        body, status, hdrs = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, hdrs, json.loads(body)
    except ValueError:
        return status, hdrs, body.decode()


async def ahttp(*args: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
    return await asyncio.to_thread(http, *args, **kw)


async def test_http_routes_and_request_status(topics: Topics, db_env: str, redis_url: str) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-h", [0, 1], metrics_port=free_port())
    tenant, _name, key = await testing.new_tenant()
    _t2, _n2, other = await testing.new_tenant()
    async with testing.running(s), FakeWorker(topics):
        assert (await ahttp(s.port, "/healthz"))[0] == 200
        status, _h, body = await ahttp(s.port, "/readyz")
        assert status == 200 and body["checks"] == {
            "redis": "ok",
            "postgres": "ok",
            "kafka": "ok",
        }
        status, hdrs, page = await ahttp(s.port, "/")
        assert status == 200 and "text/html" in hdrs["Content-Type"] and "<html" in page
        assert (await ahttp(s.port, "/nope"))[0] == 404
        c = await Client.connect(s.port, key)
        await c.submit("a", max_tokens=3)
        rid = (await c.wait_ref("a"))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None)
        auth = {"Authorization": f"Bearer {key}"}
        status, _h, body = await ahttp(s.port, f"/v1/requests/{rid}", headers=auth)
        assert status == 200 and body["request_id"] == rid and body["tenant_id"] == tenant
        status, _h, body = await ahttp(
            s.port, f"/v1/requests/{rid}", headers={"Authorization": f"Bearer {other}"}
        )
        assert status == 404 and body["error"] == "not_found"
        assert (await ahttp(s.port, f"/v1/requests/{rid}"))[0] == 401
        # With the aggregator's projection row present, its status is served (tenant-checked).
        with psycopg.connect(db_env, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO requests (request_id, tenant_id, model, status, completion_tokens)"
                " VALUES (%s, %s, 'synthetic', 'completed', 3)",
                (rid, tenant),
            )
        status, _h, body = await ahttp(s.port, f"/v1/requests/{rid}", headers=auth)
        assert body["status"] == "completed" and body["source"] == "projection"
        # /metrics only on its own port: the public one answers it like any unknown path.
        status, _h, metrics = await ahttp(s.metrics_port, "/metrics")
        assert status == 200 and "gateway_submits_total" in metrics
        status, _h, body = await ahttp(s.port, "/metrics")
        assert (status, body) == (404, {"error": "not_found", "message": "no such route"})
        await c.close()


async def test_auth_on_upgrade_sessions_origin_and_revocation(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-h", [0, 1], origins=["http://app.example"])
    _tenant, _name, key = await testing.new_tenant()
    async with testing.running(s) as gw, FakeWorker(topics):
        url = f"ws://127.0.0.1:{s.port}/ws"
        for headers in ({}, {"Authorization": "Bearer lsk_nope"}):
            with pytest.raises(InvalidStatus) as exc:
                await connect(url, additional_headers=headers)
            assert exc.value.response.status_code == 401
        # Browser flow: key -> session cookie (HttpOnly, SameSite) -> upgrade with the cookie.
        status, hdrs, _body = await ahttp(
            s.port, "/v1/sessions", "POST", {"Authorization": f"Bearer {key}"}
        )
        assert status == 200
        cookie = hdrs["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        session = cookie.split(";")[0]
        with pytest.raises(InvalidStatus) as exc:
            await connect(url, additional_headers={"Cookie": session, "Origin": "http://evil"})
        assert exc.value.response.status_code == 403
        ws = await connect(
            url, additional_headers={"Cookie": session, "Origin": "http://app.example"}
        )
        c = Client(ws)
        await c.submit("a", max_tokens=2)
        rid = (await c.wait_ref("a"))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None)
        # Revoke the key: the open socket is refused on its next action.
        await admin.revoke_key(key)
        await asyncio.sleep(s.auth_cache_s + 0.1)
        await c.submit("b", max_tokens=2)
        err = await c.wait_ref("b") if "b" in c.by_ref else None
        await c.wait(lambda: any(e["code"] == "unauthorized" for e in c.errors))
        await c.wait(lambda: c.close_code is not None)
        assert c.close_code == 4401 and err is None
        with pytest.raises(InvalidStatus):
            await connect(url, additional_headers={"Cookie": session})
        assert not gw.conns


async def test_drain_closes_sockets_with_1012(topics: Topics, db_env: str, redis_url: str) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-h", [0, 1], drain_s=2)
    _tenant, _name, key = await testing.new_tenant()
    gw = Gateway(s)
    await gw.start()
    try:
        c = await Client.connect(s.port, key)
        await c.wait(lambda: c.hello is not None)
        await gw.drain()
        await c.wait(lambda: c.close_code is not None)
        assert c.close_code == 1012
    finally:
        await gw.stop()


async def test_a_dead_delivery_loop_makes_the_replica_unready(
    topics: Topics, db_env: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivery never stops silently: the loop's death is logged and /readyz turns 503."""
    s = testing.settings(topics, redis_url, db_env, "gw-h", [0, 1])
    _tenant, _name, key = await testing.new_tenant()
    async with testing.running(s) as gw, FakeWorker(topics):
        assert (await ahttp(s.port, "/readyz"))[0] == 200

        def broken(*_args: Any) -> None:
            raise RuntimeError("a bug in delivery")

        monkeypatch.setattr(gw.parts.feed, "deliver", broken)
        c = await Client.connect(s.port, key)
        await c.submit("a", max_tokens=2)
        await c.wait_ref("a")
        for _ in range(100):
            status, _h, body = await ahttp(s.port, "/readyz")
            if status == 503:
                break
            await asyncio.sleep(0.1)
        assert status == 503 and body["checks"]["loops"].startswith(
            "error: owned tokens reader: RuntimeError: a bug in delivery"
        )
        await c.close()


async def test_a_route_provider_serves_bodies_and_streams_on_the_gateway_port(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    """What the OpenAI front end needs: a POST with a JSON body answered by a stream on the
    WebSocket's port, the handler seeing its client go away, bodies bounded (413)."""
    provided: list[Parts] = []
    gone = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        word = (await request.json())["word"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in itertools.count():
                await resp.write(f"data: {word} {i}\n\n".encode())
                await asyncio.sleep(0.01)
        except ConnectionResetError:
            gone.set()
        return resp

    def add_routes(app: web.Application, parts: Parts) -> None:
        provided.append(parts)
        app.router.add_post("/test/stream", stream)

    s = testing.settings(topics, redis_url, db_env, "gw-h", [0, 1], max_body_bytes=1024)
    _tenant, _name, key = await testing.new_tenant()
    async with testing.running(s, route_providers=[add_routes]) as gw:
        assert [p.admission for p in provided] == [gw.admission]
        url = f"http://127.0.0.1:{s.port}/test/stream"
        async with aiohttp.ClientSession() as session:
            resp = await session.post(url, json={"word": "hi"})
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            assert await resp.content.readline() == b"data: hi 0\n"
            resp.close()  # the client goes away mid-stream
            await asyncio.wait_for(gone.wait(), 10)
            async with session.post(url, json={"word": "x" * 2000}) as big:
                assert big.status == 413
            async with session.get(url) as wrong_method:
                assert wrong_method.status == 404
        c = await Client.connect(s.port, key)  # the WebSocket on the same port
        await c.wait(lambda: c.hello is not None)
        await c.close()
