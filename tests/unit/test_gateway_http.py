"""The gateway's HTTP layer on aiohttp, without the rest of the gateway: every refusal and
failure rendered as the gateway's JSON error, a path or method no route serves as its 404, and
no log line carrying a request's credentials (the access log, aiohttp's parse errors)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway import errors, http
from gateway.http import AccessLog, render_errors

SECRET = "lsk_0123456789ab_SECRETSECRETSECRET"


async def refused(_request: web.Request) -> web.Response:
    raise errors.quota_exceeded("tokens_per_day", 1500)


async def broken(_request: web.Request) -> web.Response:
    raise RuntimeError("a bug")


async def fine(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application(middlewares=[render_errors])
    app.router.add_get("/refused", refused)
    app.router.add_get("/broken", broken)
    app.router.add_get("/fine", fine)
    runner = web.AppRunner(
        app, access_log_class=AccessLog, access_log=logging.getLogger("gateway.access")
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as raw bytes (`Connection: close`): status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def get(path: str, method: str = "GET", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_refusals_failures_and_unknown_routes_are_json_errors(port: int) -> None:
    status, headers, body = await exchange(port, get("/refused"))
    assert (status, headers["Retry-After"]) == (429, "2")
    assert json.loads(body)["error"] == "quota_exceeded"
    status, _, body = await exchange(port, get("/broken"))
    assert status == 500 and json.loads(body) == {
        "error": "internal",
        "message": errors.internal(retry_after_ms=None).message,
    }
    not_found = {"error": "not_found", "message": "no such route"}
    for raw in (get("/nope"), get("/fine", "POST"), get("/fine", "DELETE")):
        status, headers, body = await exchange(port, raw)
        assert status == 404 and json.loads(body) == not_found
        assert headers["Content-Type"] == "application/json"
        assert headers["Cache-Control"] == "no-store"


async def test_no_log_line_carries_credentials(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    credentials = (f"Authorization: Bearer {SECRET}", f"Cookie: llmstream_session={SECRET}")
    status, _, _ = await exchange(port, get(f"/fine?key={SECRET}", "GET", *credentials))
    assert status == 200
    # A header aiohttp cannot parse: its error quotes the bytes around the fault.
    status, _, _ = await exchange(port, get("/fine", "GET", f"Authorization: Bearer {SECRET}\x01"))
    assert status == 400
    status, _, _ = await exchange(port, get("/broken", "GET", *credentials))
    assert status == 500
    access = [r for r in caplog.records if r.name == "gateway.access"]
    assert [(r.levelno, r.fields["path"], r.fields["status"]) for r in access] == [  # type: ignore[attr-defined]
        (logging.DEBUG, "/fine", 200),
        (logging.DEBUG, "/", 400),  # unparsed
        (logging.DEBUG, "/broken", 500),
    ]
    parse_errors = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert parse_errors == ["Error handling request from 127.0.0.1: BadHttpMessage"]
    assert any(r.name == "gateway" and r.exc_info for r in caplog.records)  # the bug, logged
    assert SECRET not in caplog.text and "Bearer" not in caplog.text


def test_every_response_gets_security_headers_the_page_a_strict_policy() -> None:
    api = http.security_headers("gw.example:8000", page=False)
    assert api["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'; sandbox"
    assert (api["X-Content-Type-Options"], api["Referrer-Policy"], api["X-Frame-Options"]) == (
        "nosniff",
        "no-referrer",
        "DENY",
    )
    page = http.security_headers("gw.example:8000", page=True)["Content-Security-Policy"]
    assert "script-src 'self';" in page and "frame-ancestors 'none'" in page
    assert "connect-src 'self' ws://gw.example:8000 wss://gw.example:8000;" in page
    # A Host header that is not a host adds nothing to the policy.
    evil = http.security_headers("x; script-src *", page=True)["Content-Security-Policy"]
    assert "connect-src 'self';" in evil and "script-src *" not in evil
