"""One error type, rendered once per front end: the WebSocket `error` frame and the HTTP JSON
response with its status and Retry-After; the auth re-check's refusals."""

from __future__ import annotations

import json

import pytest

from gateway import auth, errors, protocol
from gateway.errors import GatewayError
from gateway.http import error_response
from gateway.quota import Limits
from llmstream import apikeys


def test_websocket_rendering_has_every_field_the_error_has() -> None:
    err = GatewayError(
        errors.QUOTA_EXCEEDED, "quota exceeded: x", retry_after_ms=250, request_id="r", field="f"
    )
    assert json.loads(protocol.error_frame(err, "ref")) == {
        "type": "error",
        "code": "quota_exceeded",
        "message": "quota exceeded: x",
        "request_id": "r",
        "client_ref": "ref",
        "field": "f",
        "retry_after_ms": 250,
    }
    assert json.loads(protocol.error_frame(errors.not_found())) == {
        "type": "error",
        "code": "not_found",
        "message": "no such request",
    }


def test_a_protocol_error_is_a_gateway_error_rendered_the_same_way() -> None:
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse('{"type":"submit","client_ref":"c","model":"m","prompt":"p"}')
    err = exc.value
    assert isinstance(err, GatewayError) and not err.retryable
    assert (err.code, err.field) == (errors.INVALID_REQUEST, "max_tokens")
    assert err.frame() == protocol.error_frame(err, "c")


@pytest.mark.parametrize(
    ("err", "status", "retry_after"),
    [
        (GatewayError(errors.UNAUTHORIZED, "credentials"), 401, None),
        (GatewayError(errors.FORBIDDEN, "origin"), 403, None),
        (errors.not_found("r"), 404, None),
        (GatewayError(errors.QUOTA_EXCEEDED, "too many sockets for tenant"), 429, None),
        (errors.quota_exceeded("tokens_per_day", 1500), 429, "2"),
        (GatewayError(errors.OVERLOADED, "draining"), 503, None),
        (GatewayError(errors.OVERLOADED, "too many sockets", retry_after_ms=1000), 503, "1"),
        (errors.internal(retry_after_ms=None), 500, None),
        (GatewayError(errors.INVALID_REQUEST, "bad"), 400, None),
    ],
)
def test_http_rendering_status_and_retry_after(
    err: GatewayError, status: int, retry_after: str | None
) -> None:
    resp = error_response(err)
    assert resp.status == status and isinstance(resp.body, bytes)
    assert json.loads(resp.body) == {"error": err.code, "message": err.message}
    assert resp.headers.get("Retry-After") == retry_after


def test_http_rendering_status_override() -> None:
    resp = error_response(GatewayError(errors.INVALID_REQUEST, "POST or DELETE"), 405)
    assert resp.status == 405 and resp.reason == "Method Not Allowed"


def test_shared_refusals_are_worded_once() -> None:
    assert errors.resume_failed("r").message == "resume failed, try again"
    assert errors.resume_failed("r").request_id == "r"
    busy = errors.overloaded("too many resumes in progress", request_id="r")
    assert (busy.code, busy.retry_after_ms, busy.reason) == ("overloaded", 1000, "overloaded")


class FakeSessions(auth.Sessions):
    def __init__(self, live: dict[str, tuple[str, str]]) -> None:  # no Redis
        self.live = live
        self.secrets = [b"s" * 32]

    async def lookup(self, session_id: str) -> tuple[str, str] | None:
        return self.live.get(session_id)


async def test_recheck_refuses_revoked_keys_and_ended_sessions() -> None:
    new = apikeys.generate()
    limits = Limits("free", 1, 1, 1, 1, 1, 1)
    rows = {new.key_id: auth.KeyRow(new.key_id, "t1", new.sha256, True, limits)}

    async def lookup(key_id: str) -> auth.KeyRow | None:
        return rows.get(key_id)

    sessions = FakeSessions({"s1": (new.key_id, "t1")})
    a = auth.Authenticator(auth.KeyCache(lookup, 0), sessions)
    p = await a.principal(None, "llmstream_session=s1")
    assert p is not None and p.limits == limits  # the key's tier, not the placeholder
    assert await a.recheck(p, "s1") == p
    assert auth.session_id_of(None, "llmstream_session=s1") == "s1"
    assert auth.session_id_of(f"Bearer {new.key}", "llmstream_session=s1") is None
    del sessions.live["s1"]
    with pytest.raises(GatewayError, match="session expired or signed out") as ended:
        await a.recheck(p, "s1")
    assert ended.value.code == errors.UNAUTHORIZED
    rows[new.key_id] = auth.KeyRow(new.key_id, "t1", new.sha256, False, limits)
    with pytest.raises(GatewayError, match="API key revoked or expired"):
        await a.recheck(p, None)
