"""HTTP routes on the gateway's port (docs/protocol.md, "HTTP routes"), served by websockets'
`process_request` hook: an upgrade to `/ws` goes through the WebSocket front end's checks, every
other request is answered here. A `GatewayError` from any route is rendered once, by
`error_response`, as `{"error": code, "message": ...}` with its status (and `Retry-After`).
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway import auth, errors
from gateway.errors import GatewayError
from gateway.inflight import Inflight
from gateway.resources import Resources
from gateway.settings import Settings
from gateway.store import MAX_REQUEST_ID_CHARS
from gateway.ws import WebSocketFrontEnd, origin_allowed

log = logging.getLogger("gateway")

STATUS_OF_CODE = {
    errors.INVALID_REQUEST: 400,
    errors.UNAUTHORIZED: 401,
    errors.FORBIDDEN: 403,
    errors.NOT_FOUND: 404,
    errors.QUOTA_EXCEEDED: 429,
    errors.INTERNAL: 500,
    errors.OVERLOADED: 503,
}
REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
WEBSOCKET_PATHS = ("/ws", "/v1/ws")
REQUEST_QUERY = (
    "SELECT request_id, tenant_id, model, status, submitted_at, finished_at, ttft_ms,"
    " finish_reason, finish_message, error_code, prompt_tokens, completion_tokens,"
    " reserved_tokens, attempts, last_seq, cancel_requested"
    " FROM requests WHERE request_id = %s"
)


def response(
    status: int, body: bytes | str, content_type: str = "application/json", **headers: str
) -> Response:
    """`headers` by keyword: `Set_Cookie="..."` is sent as `Set-Cookie`."""
    data = body.encode() if isinstance(body, str) else body
    h = Headers()
    h["Content-Type"] = content_type
    h["Content-Length"] = str(len(data))
    h["Cache-Control"] = "no-store"
    for k, v in headers.items():
        h[k.replace("_", "-")] = v
    return Response(status, REASONS.get(status, "Status"), h, data)


def json_response(status: int, obj: Any, **headers: str) -> Response:
    return response(status, json.dumps(obj, default=str), **headers)


def error_response(err: GatewayError, status: int | None = None) -> Response:
    """The HTTP rendering of every gateway error (`status` overrides the code's)."""
    headers = {}
    if err.retry_after_ms is not None:
        headers["Retry_After"] = str(math.ceil(err.retry_after_ms / 1000))
    body = {"error": err.code, "message": err.message}
    return json_response(status or STATUS_OF_CODE.get(err.code, 500), body, **headers)


def load_static(directory: Path) -> dict[str, tuple[bytes, str]]:
    """The browser page's files by path ("/" is index.html), read once at start."""
    files: dict[str, tuple[bytes, str]] = {}
    if not directory.is_dir():
        return files
    for path in directory.iterdir():
        if path.is_file():
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            files["/" + path.name] = (path.read_bytes(), ctype)
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


@dataclass(kw_only=True, eq=False)
class HttpRoutes:
    settings: Settings
    resources: Resources
    sockets: WebSocketFrontEnd
    inflight: Inflight
    readiness: Callable[[], Awaitable[tuple[bool, dict[str, str]]]]
    static: dict[str, tuple[bytes, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.static = load_static(self.settings.static_dir)

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """websockets' hook: None lets an accepted upgrade proceed; a response answers."""
        try:
            return await self._route(connection, request)
        except GatewayError as err:
            return error_response(err)
        except Exception:
            log.exception("HTTP handler failed")
            return error_response(errors.internal(retry_after_ms=None))

    async def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        method = request.method
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and path in WEBSOCKET_PATHS:
            await self.sockets.check_upgrade(connection, request.headers)
            return None
        if path == "/healthz":
            return json_response(200, {"status": "ok", "gateway_id": self.settings.gateway_id})
        if path == "/readyz":
            ok, checks = await self.readiness()
            return json_response(200 if ok else 503, {"ready": ok, "checks": checks})
        if path == "/metrics":
            return response(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        if path == "/v1/sessions":
            return await self._sessions(method, request.headers)
        if path.startswith("/v1/requests/") and method == "GET":
            return await self._request_status(path.removeprefix("/v1/requests/"), request.headers)
        if method == "GET" and path in self.static:
            body, ctype = self.static[path]
            return response(200, body, ctype)
        raise GatewayError(errors.NOT_FOUND, "no such route")

    async def _sessions(self, method: str, headers: Headers) -> Response:
        """Browser sign-in (a key -> an HttpOnly session cookie) and sign-out."""
        sessions = self.resources.auth.sessions
        if method == "POST":
            principal = await self.resources.auth.principal(headers.get("Authorization"), None)
            if principal is None:
                raise GatewayError(errors.UNAUTHORIZED, "invalid API key")
            if not origin_allowed(self.settings, headers):
                raise GatewayError(errors.FORBIDDEN, "origin")
            sid = await sessions.create(principal)
            ttl = self.settings.session_ttl_s
            # Secure whenever the browser reached us over TLS (ours, or a proxy's: set
            # LLMSTREAM_GATEWAY_COOKIE_SECURE=1 there).
            secure = self.settings.cookie_secure or bool(self.settings.tls_cert)
            return json_response(
                200,
                {"tenant_id": principal.tenant_id, "expires_in_s": ttl},
                Set_Cookie=auth.set_cookie(sid, ttl, secure),
            )
        if method == "DELETE":
            old = auth.cookie_value(headers.get("Cookie"))
            if old:
                await sessions.delete(old)
            return json_response(200, {"signed_out": True}, Set_Cookie=auth.clear_cookie())
        return error_response(GatewayError(errors.INVALID_REQUEST, "POST or DELETE"), 405)

    async def _request_status(self, request_id: str, headers: Headers) -> Response:
        """Status and usage from the aggregator's projection, else what the gateway knows."""
        principal = await self.resources.auth.principal(
            headers.get("Authorization"), headers.get("Cookie")
        )
        if principal is None:
            raise GatewayError(errors.UNAUTHORIZED, "credentials")
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
            raise errors.not_found()
        row = await self._projected(request_id)
        if row is not None:
            if row["tenant_id"] != principal.tenant_id:
                raise errors.not_found()
            row["source"] = "projection"
            return json_response(200, row)
        if await self.resources.store.lookup(principal.tenant_id, request_id) is None:
            raise errors.not_found()
        state = "finished" if self.inflight.finished(request_id) else "accepted"
        body = {
            "request_id": request_id,
            "tenant_id": principal.tenant_id,
            "status": state,
            "source": "gateway",
        }
        return json_response(200, body)

    async def _projected(self, request_id: str) -> dict[str, Any] | None:
        try:
            async with self.resources.postgres.connection() as conn:
                cur = await conn.execute(REQUEST_QUERY, (request_id,))
                values = await cur.fetchone()
                if values is None or cur.description is None:
                    return None
                return {d.name: v for d, v in zip(cur.description, values, strict=True)}
        except psycopg.errors.UndefinedTable:  # no projection schema (aggregator never ran)
            return None
