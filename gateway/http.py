"""HTTP on the gateway's port (docs/protocol.md, "HTTP routes"), served by aiohttp: the routes
here, the upgrade of `/ws` (checked and served by the WebSocket front end, gateway/ws.py), and
the routes other front ends add (gateway/server.py, `ROUTE_PROVIDERS`). A `GatewayError` from
any route is rendered once, by `error_response` in the `render_errors` middleware, as
`{"error": code, "message": ...}` with its status (and `Retry-After`); a path no route serves
gets the same 404 whatever its method.
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway import auth, errors
from gateway.errors import GatewayError
from gateway.inflight import Inflight
from gateway.resources import Resources
from gateway.settings import Settings
from gateway.store import MAX_REQUEST_ID_CHARS
from gateway.ws import WebSocketFrontEnd, origin_allowed
from llmstream import telemetry

log = logging.getLogger("gateway")


class AccessLog(AbstractAccessLogger):
    """One DEBUG line per HTTP request (a WebSocket's when it closes): method, path, status,
    duration. No header and no query string: they may carry a key or a session cookie."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = telemetry.fields(
            method=request.method, path=request.path, status=response.status, s=round(time, 3)
        )
        self.logger.debug("http request", extra=fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


class _WithoutRequestBytes(logging.Filter):
    """aiohttp logs a request it cannot parse with the parser's error, which quotes the bytes
    around the fault: perhaps an Authorization or Cookie header. Only the error's type stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}", None
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("aiohttp.server").addFilter(_WithoutRequestBytes())

# Security headers of every response (page, API, errors, streams): no framing, no MIME
# sniffing, no referrer. The page's policy allows only its own script, style and connections
# (its one script and stylesheet are files, no inline code); an API answer allows nothing.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src {connect}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def security_headers(host: str | None, page: bool) -> dict[str, str]:
    """The headers every response gets (pure); `page`: a file of the browser page."""
    if not page:
        return {**SECURITY_HEADERS, "Content-Security-Policy": API_CSP}
    # 'self' does not cover ws:/wss: in every browser: the page's own host, explicitly (only
    # a well-formed one: the Host header is the client's).
    connect = ["'self'"]
    if host and _HOST.fullmatch(host):
        connect += [f"ws://{host}", f"wss://{host}"]
    csp = PAGE_CSP.format(connect=" ".join(connect))
    return {**SECURITY_HEADERS, "Content-Security-Policy": csp}


STATUS_OF_CODE = {
    errors.INVALID_REQUEST: 400,
    errors.UNAUTHORIZED: 401,
    errors.FORBIDDEN: 403,
    errors.NOT_FOUND: 404,
    errors.QUOTA_EXCEEDED: 429,
    errors.INTERNAL: 500,
    errors.OVERLOADED: 503,
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
) -> web.Response:
    """`headers` by keyword: `Set_Cookie="..."` is sent as `Set-Cookie`."""
    data = body.encode() if isinstance(body, str) else body
    h = {"Content-Type": content_type, "Cache-Control": "no-store"}
    for k, v in headers.items():
        h[k.replace("_", "-")] = v
    return web.Response(status=status, body=data, headers=h)


def json_response(status: int, obj: Any, **headers: str) -> web.Response:
    return response(status, json.dumps(obj, default=str), **headers)


def error_response(err: GatewayError, status: int | None = None) -> web.Response:
    """The HTTP rendering of every gateway error (`status` overrides the code's)."""
    headers = {}
    if err.retry_after_ms is not None:
        headers["Retry_After"] = str(math.ceil(err.retry_after_ms / 1000))
    body = {"error": err.code, "message": err.message}
    return json_response(status or STATUS_OF_CODE.get(err.code, 500), body, **headers)


def no_route() -> GatewayError:
    return GatewayError(errors.NOT_FOUND, "no such route")


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route's refusals and failures as HTTP (never a traceback)."""
    try:
        return await handler(request)
    except GatewayError as err:
        return error_response(err)
    except web.HTTPException as exc:
        # The router's own refusal (no such path, or not with this method): a 404 like any.
        if exc is request.match_info.http_exception:
            return error_response(no_route())
        raise
    except Exception:
        log.exception("HTTP handler failed")
        return error_response(errors.internal(retry_after_ms=None))


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


async def metrics(_request: web.Request) -> web.Response:
    """`/metrics`, on its own port only (GATEWAY_METRICS_PORT): never the public one."""
    return response(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)


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

    async def _security_headers(self, request: web.BaseRequest, resp: web.StreamResponse) -> None:
        page = request.path in self.static
        for name, value in security_headers(request.host, page).items():
            resp.headers.setdefault(name, value)

    def add_routes(self, app: web.Application) -> None:
        # On every response as it is prepared: handlers', errors', streams' (SSE) alike.
        app.on_response_prepare.append(self._security_headers)
        router = app.router
        for path in WEBSOCKET_PATHS:
            router.add_get(path, self._websocket, allow_head=False)
        # Any method, as they always answered.
        router.add_route("*", "/healthz", self._healthz)
        router.add_route("*", "/readyz", self._readyz)
        router.add_route("*", "/v1/sessions", self._sessions)
        router.add_get("/v1/requests/{request_id:.*}", self._request_status, allow_head=False)
        for path in self.static:
            router.add_get(path, self._static)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise no_route()  # a plain GET of /ws
        return await self.sockets.handle(request)

    async def _healthz(self, _request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok", "gateway_id": self.settings.gateway_id})

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok, checks = await self.readiness()
        return json_response(200 if ok else 503, {"ready": ok, "checks": checks})

    async def _static(self, request: web.Request) -> web.Response:
        body, ctype = self.static[request.path]
        return response(200, body, ctype)

    async def _sessions(self, request: web.Request) -> web.Response:
        """Browser sign-in (a key -> an HttpOnly session cookie) and sign-out."""
        sessions, headers = self.resources.auth.sessions, request.headers
        if request.method == "POST":
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
        if request.method == "DELETE":
            old = auth.cookie_value(headers.get("Cookie"))
            if old:
                await sessions.delete(old)
            return json_response(200, {"signed_out": True}, Set_Cookie=auth.clear_cookie())
        return error_response(GatewayError(errors.INVALID_REQUEST, "POST or DELETE"), 405)

    async def _request_status(self, request: web.Request) -> web.Response:
        """Status and usage from the aggregator's projection, else what the gateway knows."""
        request_id, headers = request.match_info["request_id"], request.headers
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
