"""The gateway process: websockets server (+ HTTP routes on the same port), Kafka producer of
prompts, consumer of this replica's own tokens partitions, Redis (quota, sessions, request
metadata, idempotency) and PostgreSQL (keys, request status).

Redis keys written here besides the quota (llmstream/quota_keys.py):
- `gw:req:{request_id}` hash: tenant, topic, partition, offset (a lower bound of the offset of
  the request's first event in its reply partition), submitted_ms, gateway, attached_ms (last
  submit/resume). 48 h.
- `gw:watchers:{request_id}` set of "<gateway id>/<socket id>" watching the request; a grace
  timer cancels only when it is empty (nobody on any replica follows the request). 48 h.
- `gw:idem:{tenant}:<sha256(idempotency_key)>` -> request id, 24 h.
- `gw:session:<sha256(session id)>` -> "key_id tenant_id", sliding TTL.
- `quota:{tenant}:sockets` zset of open sockets on all replicas (tenant socket cap), score =
  lease expiry, refreshed every 20 s (gateway/quota.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway import auth, protocol
from gateway.delivery_trace import DeliverySpans
from gateway.metrics import GatewayMetrics
from gateway.quota import Limits, Quota
from gateway.router import Outbox, Router, Watch
from gateway.settings import Settings, split_partitions
from llmstream import codec, quota_keys, telemetry, tracing
from llmstream.fold import finish_reason_name
from llmstream.tracing import SpanKind, Status, StatusCode

log = logging.getLogger("gateway")
# websockets logs every request header (Authorization, Cookie) and every frame (prompts) at
# DEBUG: its logger stays at INFO whatever LLMSTREAM_LOG_LEVEL says.
ws_log = logging.getLogger("gateway.websockets")
ws_log.setLevel(logging.INFO)

META_TTL_S = 48 * 3600
# A socket's entry in its tenant's socket set lives this long unless refreshed (a crashed
# replica's sockets stop counting after it).
SOCKET_LEASE_MS = 60_000
IDEMPOTENCY_TTL_S = 24 * 3600
TERMINALS = ("completed", "failed")


def _meta_key(request_id: str) -> str:
    return f"gw:req:{request_id}"


def _watchers_key(request_id: str) -> str:
    return f"gw:watchers:{request_id}"


def _idem_key(tenant_id: str, key: str) -> str:
    return f"gw:idem:{{{tenant_id}}}:{hashlib.sha256(key.encode()).hexdigest()}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _outcome(event: Any) -> str:
    """A terminal event's outcome label: the finish reason, or the failure code."""
    if event.HasField("failed"):
        return str(event.failed.code) or "failed"
    return finish_reason_name(event.completed.finish_reason)


@dataclass(eq=False)
class Conn:
    ws: ServerConnection
    principal: auth.Principal
    outbox: Outbox
    wake: asyncio.Event
    watches: dict[str, Watch] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    drained: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    received_at: float = 0.0  # monotonic time the frame being handled was read
    session_id: str | None = None  # opened with a browser session: re-checked on each action


def _response(
    status: int, body: bytes | str, content_type: str = "application/json", **headers: str
) -> Response:
    data = body.encode() if isinstance(body, str) else body
    h = Headers()
    h["Content-Type"] = content_type
    h["Content-Length"] = str(len(data))
    h["Cache-Control"] = "no-store"
    for k, v in headers.items():
        h[k.replace("_", "-")] = v
    reasons = {
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
    return Response(status, reasons.get(status, "Status"), h, data)


def _json_response(status: int, obj: Any, **headers: str) -> Response:
    return _response(status, json.dumps(obj, default=str), **headers)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.router = Router()
        self.delivery_spans = DeliverySpans(settings.tokens_topic)
        self.metrics = GatewayMetrics(
            settings.gateway_id, lambda: len(self.conns), lambda: len(self.inflight)
        )
        self.conns: set[Conn] = set()
        self.inflight: dict[str, float] = {}  # accepted here, not terminal yet
        self.recent_terminal: dict[str, None] = {}  # bounded, insertion-ordered
        self.owned: list[int] = []
        self.low: dict[int, int] = {}  # owned partition -> lower bound of the next offset
        self.assignment: set[TopicPartition] = set()
        self.draining = False
        # Upgrades authenticated by process_request, picked up by the handler (weak: a
        # handshake that fails after process_request leaves nothing behind).
        # Value: (principal, socket id, browser session id or None for a bearer key).
        self._pending: weakref.WeakKeyDictionary[
            ServerConnection, tuple[auth.Principal, str, str | None]
        ] = weakref.WeakKeyDictionary()
        self._rr = 0
        self._resume_slots = asyncio.Semaphore(settings.max_resumes)
        self._tasks: set[asyncio.Task[None]] = set()
        self._static: dict[str, tuple[bytes, str]] = {}
        self.redis: aioredis.Redis | None = None
        self.pool: AsyncConnectionPool | None = None
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.server: Server | None = None
        self.quota: Quota | None = None
        self.keys: auth.KeyCache | None = None
        self.sessions: auth.Sessions | None = None
        self._consume_task: asyncio.Task[None] | None = None
        self._admin: AIOKafkaAdminClient | None = None
        # Partitions of other replicas read live for resumed requests (one shared consumer).
        self.borrow_consumer: AIOKafkaConsumer | None = None
        self._borrow_lock = asyncio.Lock()
        self.prompt_lag = 0
        # Undecodable records on the tokens topic: skipped, logged at most every 10 s.
        self._undecodable_skipped = 0
        self._undecodable_logged_at = -1e9

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        s = self.s
        # /metrics is served on the main port, so the provider is needed however the gateway
        # is started (CLI or in-process); a no-op if one exists already.
        telemetry.setup_metrics("gateway")
        self._load_static()
        # A blocking pool: under a burst (hundreds of upgrades at once) callers wait up to 5 s
        # for one of a bounded number of connections instead of failing with "Too many
        # connections".
        self.redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                s.redis_url,
                max_connections=64,
                timeout=5,
                socket_timeout=5,
                socket_connect_timeout=5,
                # A pool given explicitly gets no retries by default: after a Redis restart
                # every pooled connection would fail one command (HTTP 500 upgrades). Retried
                # on a new connection instead; not after a timeout (the command may have run).
                retry=Retry(
                    ExponentialBackoff(cap=1.0, base=0.05),
                    3,
                    supported_errors=(aioredis.ConnectionError,),
                ),
            )
        )
        self.quota = Quota(self.redis)
        self.sessions = auth.Sessions(self.redis, s.session_ttl_s)
        # check: a pooled connection is tested before use, so the first key lookups after a
        # PostgreSQL restart get a fresh connection instead of failing (HTTP 500 upgrades).
        self.pool = AsyncConnectionPool(
            s.database_url,
            min_size=1,
            max_size=4,
            open=False,
            kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection,
        )
        await self.pool.open(wait=True, timeout=15)
        self.keys = auth.KeyCache(auth.pg_lookup(self.pool), s.auth_cache_s)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
            client_id=s.gateway_id,
        )
        await self.producer.start()
        count = len(await self.producer.partitions_for(s.tokens_topic))
        self.owned = (
            sorted(p for p in s.partitions if p < count)
            if s.partitions is not None
            else split_partitions(count, s.replica_index, s.replicas)
        )
        if not self.owned:
            raise RuntimeError(
                f"no partitions of {s.tokens_topic} ({count}) owned by {s.gateway_id}"
            )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            # A long poll over fixed partitions: the broker answers as soon as an event
            # arrives, so this only bounds empty fetches (10 ms cost 5% of a core idle).
            fetch_max_wait_ms=100,
            client_id=s.gateway_id,
        )
        await self.consumer.start()
        tps = [TopicPartition(s.tokens_topic, p) for p in self.owned]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.low[tp.partition] = await self.consumer.position(tp)
        self.assignment = set(self.consumer.assignment())
        self._consume_task = asyncio.create_task(self._consume())
        self.borrow_consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=10,
            auto_offset_reset="latest",
            client_id=f"{s.gateway_id}-borrow",
        )
        await self.borrow_consumer.start()
        self._spawn(self._borrow_loop())
        self._spawn(self._housekeeping())
        if s.max_prompt_lag > 0:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap)
            await self._admin.start()
            self._spawn(self._watch_prompt_lag())
        self.server = await serve(
            self._handler,
            s.host,
            s.port,
            process_request=self._process_request,
            logger=ws_log,
            ssl=s.ssl_context(),
            compression=None,
            max_size=max(1 << 20, 4 * s.max_frame_bytes),
            close_timeout=2,
            ping_interval=20,
            ping_timeout=20,
        )
        if s.port == 0:
            s.port = next(iter(self.server.sockets)).getsockname()[1]
        log.info(
            "gateway listening",
            extra=telemetry.fields(
                port=s.port, partitions=self.owned, id=s.gateway_id, tls=bool(s.tls_cert)
            ),
        )

    async def drain(self) -> None:
        """SIGTERM: refuse new sockets, close open ones with 1012 (clients reconnect elsewhere
        and resume; their requests keep running), then stop."""
        self.draining = True
        for conn in list(self.conns):
            conn.drained = True
            self._spawn(conn.ws.close(protocol.CLOSE_DRAIN, "gateway restarting: reconnect"))
        end = time.monotonic() + self.s.drain_s
        while self.conns and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
        for t in list(self._tasks):
            t.cancel()
        if self._consume_task is not None:
            self._consume_task.cancel()
            with contextlib.suppress(BaseException):
                await self._consume_task
        if self._admin is not None:
            await self._admin.close()
        if self.consumer is not None:
            await self.consumer.stop()
        if self.borrow_consumer is not None:
            await self.borrow_consumer.stop()
        if self.producer is not None:
            await self.producer.stop()
        if self.pool is not None:
            await self.pool.close()
        if self.redis is not None:
            await self.redis.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        """A background task whose failure is logged (quietly while shutting down)."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.draining:
                    log.debug("background task failed during shutdown", exc_info=True)
                else:
                    log.exception("background task failed")

        task: asyncio.Task[None] = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- live consumption of owned partitions ------------------------------------------

    async def _consume(self) -> None:
        assert self.consumer is not None
        while True:
            try:
                batch = await self.consumer.getmany(timeout_ms=200)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("tokens consumer failed; retrying")
                await asyncio.sleep(0.5)
                continue
            finished: list[tuple[str, str]] = []
            for tp, records in batch.items():
                for rec in records:
                    self.low[tp.partition] = rec.offset + 1
                    try:
                        event = codec.decode(rec.value)
                    except codec.DecodeError as exc:
                        self._undecodable(rec, str(exc))
                        continue
                    self.metrics.token_events += 1
                    try:
                        delivered = self.router.deliver(event)
                        self.delivery_spans.on_event(event, tp.partition, rec.offset, delivered)
                    except Exception:  # one bad event must not stop delivery to everyone
                        log.exception("routing an event failed")
                    if event.WhichOneof("body") in TERMINALS:
                        if event.request_id in self.inflight:
                            self.metrics.requests[_outcome(event)] += 1
                            if event.tenant_id:
                                finished.append((event.tenant_id, event.request_id))
                        self._terminal(event.request_id)
            if finished:
                self._spawn(self._free_streams(finished))
            await asyncio.sleep(0)

    def _undecodable(self, rec: Any, reason: str) -> None:
        """A record that is not an llmstream event is skipped (the aggregator parks it in the
        dead-letter topic); one log line per 10 s at most, with the count skipped since."""
        self._undecodable_skipped += 1
        now = time.monotonic()
        if now - self._undecodable_logged_at < 10:
            return
        log.warning(
            "undecodable record skipped",
            extra=telemetry.fields(
                reason=reason,
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                skipped=self._undecodable_skipped,
            ),
        )
        self._undecodable_logged_at, self._undecodable_skipped = now, 0

    async def _free_streams(self, finished: list[tuple[str, str]]) -> None:
        """Free the concurrent-stream slots of finished requests at once (ZREM is idempotent;
        the aggregator's settlement removes them too and settles the tokens)."""
        assert self.quota is not None
        await self.quota.end_streams(finished)

    async def _watch_prompt_lag(self) -> None:
        """Keep `prompt_lag`: prompts written but not yet finished (committed) by the workers."""
        assert self._admin is not None and self.producer is not None
        assert self.consumer is not None
        topic = self.s.prompts_topic
        while True:
            try:
                parts = await self.producer.partitions_for(topic)
                tps = [TopicPartition(topic, p) for p in sorted(parts)]
                ends = await self.consumer.end_offsets(tps)
                committed = await self._admin.list_consumer_group_offsets(
                    self.s.worker_group, partitions=tps
                )
                lag = 0
                for tp in tps:
                    meta = committed.get(tp)
                    done = meta.offset if meta is not None and meta.offset >= 0 else 0
                    lag += max(0, ends[tp] - done)
                self.prompt_lag = lag
                self.metrics.prompt_lag = lag
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("prompt lag unknown", exc_info=True)
            await asyncio.sleep(self.s.lag_interval_s)

    async def _housekeeping(self) -> None:
        """Refresh this replica's socket leases (tenant socket caps); forget in-flight requests
        whose terminal event never came within the stream lease (so the load-shedding count
        cannot leak)."""
        lease_s = quota_keys.DEFAULT_STREAM_LEASE_MS / 1000
        assert self.quota is not None
        while True:
            await asyncio.sleep(SOCKET_LEASE_MS / 3000)
            try:
                await self.quota.refresh_sockets(
                    [(c.principal.tenant_id, self._member(c)) for c in self.conns],
                    _now_ms() + SOCKET_LEASE_MS,
                )
            except Exception:
                log.warning("socket lease refresh failed", exc_info=True)
            cutoff = time.monotonic() - lease_s
            for rid in [r for r, t in self.inflight.items() if t < cutoff]:
                del self.inflight[rid]

    def _overloaded(self) -> bool:
        lag = self.s.max_prompt_lag
        return len(self.inflight) >= self.s.max_inflight or (lag > 0 and self.prompt_lag >= lag)

    def _shedding(self) -> bool:
        lag = self.s.max_prompt_lag
        return len(self.inflight) * 2 >= self.s.max_inflight or (
            lag > 0 and self.prompt_lag * 2 >= lag
        )

    # ---- live reading of other replicas' partitions (resumed requests) --------------------

    async def _reassign_borrowed(self, wanted: set[TopicPartition]) -> None:
        """Change the borrowed partitions; kept ones continue where they were, new ones start
        at their end (the resume's catch-up covers everything before). Under _borrow_lock."""
        c = self.borrow_consumer
        assert c is not None
        current = set(c.assignment())
        if wanted == current:
            return
        positions = {tp: await c.position(tp) for tp in current & wanted}
        c.assign(sorted(wanted, key=lambda t: (t.topic, t.partition)))
        for tp, pos in positions.items():
            c.seek(tp, pos)
        new = wanted - current
        if new:
            await c.seek_to_end(*new)
            for tp in new:
                await c.position(tp)

    async def _borrow(self, tp: TopicPartition) -> None:
        c = self.borrow_consumer
        assert c is not None
        async with self._borrow_lock:
            if tp not in c.assignment():
                await self._reassign_borrowed(set(c.assignment()) | {tp})

    async def _borrow_loop(self) -> None:
        c = self.borrow_consumer
        assert c is not None
        last_check = 0.0
        while True:
            batch: dict[TopicPartition, list[Any]] = {}
            try:
                async with self._borrow_lock:
                    if time.monotonic() - last_check > 1:
                        last_check = time.monotonic()
                        needed = {TopicPartition(t, p) for t, p in self.router.borrowed()}
                        await self._reassign_borrowed(needed & set(c.assignment()))
                    if c.assignment():
                        batch = await c.getmany(timeout_ms=20)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("borrowed partitions consumer failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if not batch:
                await asyncio.sleep(0.02)
                continue
            for tp, records in batch.items():
                for rec in records:
                    try:
                        event = codec.decode(rec.value)
                    except codec.DecodeError as exc:
                        self._undecodable(rec, str(exc))
                        continue
                    try:
                        delivered = self.router.deliver(event)
                        self.delivery_spans.on_event(event, tp.partition, rec.offset, delivered)
                    except Exception:
                        log.exception("routing an event failed")
            await asyncio.sleep(0)

    def _terminal(self, request_id: str) -> None:
        self.inflight.pop(request_id, None)
        self.recent_terminal[request_id] = None
        if len(self.recent_terminal) > 100_000:
            for rid in list(self.recent_terminal)[:50_000]:
                del self.recent_terminal[rid]

    # ---- HTTP ----------------------------------------------------------------------------

    def _load_static(self) -> None:
        d = self.s.static_dir
        if not d.is_dir():
            return
        for path in d.iterdir():
            if path.is_file():
                ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                if ctype.startswith("text/") or ctype.endswith("javascript"):
                    ctype += "; charset=utf-8"
                self._static["/" + path.name] = (path.read_bytes(), ctype)
        if "/index.html" in self._static:
            self._static["/"] = self._static["/index.html"]

    async def _principal_of(self, headers: Headers) -> auth.Principal | None:
        assert self.keys is not None and self.sessions is not None
        key = auth.bearer(headers.get("Authorization"))
        if key is not None:
            return await self.keys.verify_key(key)
        sid = auth.cookie_value(headers.get("Cookie"))
        if sid is None:
            return None
        found = await self.sessions.lookup(sid)
        if found is None:
            return None
        key_id, tenant_id = found
        dummy = Limits("", 1, 1, 1, 1, 1, 1)
        return await self.keys.still_valid(auth.Principal(tenant_id, key_id, dummy))

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        try:
            return await self._route(connection, request)
        except Exception:
            log.exception("HTTP handler failed")
            return _json_response(500, {"error": protocol.INTERNAL, "message": "internal error"})

    async def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        method = request.method
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and path in ("/ws", "/v1/ws"):
            return await self._check_upgrade(connection, request)
        if path == "/healthz":
            return _json_response(200, {"status": "ok", "gateway_id": self.s.gateway_id})
        if path == "/readyz":
            return await self._readyz()
        if path == "/metrics":
            return _response(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        if path == "/v1/sessions":
            return await self._sessions(method, request.headers)
        if path.startswith("/v1/requests/") and method == "GET":
            return await self._request_status(path.removeprefix("/v1/requests/"), request.headers)
        if method == "GET" and path in self._static:
            body, ctype = self._static[path]
            return _response(200, body, ctype)
        return _json_response(404, {"error": protocol.NOT_FOUND, "message": "no such route"})

    async def _check_upgrade(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        headers = request.headers
        if self.draining:
            return _json_response(503, {"error": protocol.OVERLOADED, "message": "draining"})
        if not self._origin_allowed(headers):
            return _json_response(403, {"error": protocol.FORBIDDEN, "message": "origin"})
        if len(self.conns) + len(self._pending) >= self.s.max_sockets:
            return _json_response(
                503, {"error": protocol.OVERLOADED, "message": "too many sockets"}, Retry_After="1"
            )
        principal = await self._principal_of(headers)
        if principal is None:
            return _json_response(
                401, {"error": protocol.UNAUTHORIZED, "message": "missing or invalid credentials"}
            )
        socket_id = uuid.uuid4().hex[:16]
        assert self.quota is not None
        if not await self.quota.open_socket(
            principal.tenant_id,
            f"{self.s.gateway_id}/{socket_id}",
            principal.limits.max_sockets,
            _now_ms(),
            SOCKET_LEASE_MS,
        ):
            self.metrics.quota_refusals["sockets"] += 1
            return _json_response(
                429, {"error": protocol.QUOTA_EXCEEDED, "message": "too many sockets for tenant"}
            )
        # A socket opened with a session cookie lives only as long as its session.
        session_id = None
        if auth.bearer(headers.get("Authorization")) is None:
            session_id = auth.cookie_value(headers.get("Cookie"))
        self._pending[connection] = (principal, socket_id, session_id)
        return None

    def _origin_allowed(self, headers: Headers) -> bool:
        origin, host = headers.get("Origin"), headers.get("Host")
        return auth.origin_allowed(origin, self.s.origins, host, tls=bool(self.s.tls_cert))

    async def _readyz(self) -> Response:
        checks: dict[str, str] = {}
        try:
            assert self.redis is not None
            pong: Any = self.redis.ping()
            await asyncio.wait_for(pong, 1)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        try:
            assert self.pool is not None
            async with asyncio.timeout(1), self.pool.connection() as conn:
                await conn.execute("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {type(exc).__name__}"
        try:
            assert self.producer is not None
            await asyncio.wait_for(self.producer.partitions_for(self.s.tokens_topic), 1)
            checks["kafka"] = "ok" if self.assignment else "error: no partitions"
        except Exception as exc:
            checks["kafka"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values()) and not self.draining
        return _json_response(200 if ok else 503, {"ready": ok, "checks": checks})

    async def _sessions(self, method: str, headers: Headers) -> Response:
        assert self.keys is not None and self.sessions is not None
        if method == "POST":
            key = auth.bearer(headers.get("Authorization"))
            principal = await self.keys.verify_key(key) if key else None
            if principal is None:
                return _json_response(
                    401, {"error": protocol.UNAUTHORIZED, "message": "invalid API key"}
                )
            if not self._origin_allowed(headers):
                return _json_response(403, {"error": protocol.FORBIDDEN, "message": "origin"})
            sid = await self.sessions.create(principal)
            return _json_response(
                200,
                {"tenant_id": principal.tenant_id, "expires_in_s": self.s.session_ttl_s},
                # Secure whenever the browser reached us over TLS (ours, or a proxy's: set
                # LLMSTREAM_GATEWAY_COOKIE_SECURE=1 there).
                Set_Cookie=auth.set_cookie(
                    sid, self.s.session_ttl_s, self.s.cookie_secure or bool(self.s.tls_cert)
                ),
            )
        if method == "DELETE":
            old = auth.cookie_value(headers.get("Cookie"))
            if old:
                await self.sessions.delete(old)
            return _json_response(200, {"signed_out": True}, Set_Cookie=auth.clear_cookie())
        return _json_response(405, {"error": protocol.INVALID_REQUEST, "message": "POST or DELETE"})

    async def _request_status(self, request_id: str, headers: Headers) -> Response:
        principal = await self._principal_of(headers)
        if principal is None:
            return _json_response(401, {"error": protocol.UNAUTHORIZED, "message": "credentials"})
        not_found = _json_response(404, {"error": protocol.NOT_FOUND, "message": "no such request"})
        if not request_id or len(request_id) > 128:
            return not_found
        assert self.pool is not None and self.redis is not None
        row: dict[str, Any] | None = None
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT request_id, tenant_id, model, status, submitted_at, finished_at,"
                    " ttft_ms, finish_reason, finish_message, error_code, prompt_tokens,"
                    " completion_tokens, reserved_tokens, attempts, last_seq, cancel_requested"
                    " FROM requests WHERE request_id = %s",
                    (request_id,),
                )
                values = await cur.fetchone()
                if values is not None and cur.description is not None:
                    row = {d.name: v for d, v in zip(cur.description, values, strict=True)}
        except psycopg.errors.UndefinedTable:
            row = None
        if row is not None:
            if row["tenant_id"] != principal.tenant_id:
                return not_found
            row["source"] = "projection"
            return _json_response(200, row)
        meta = await self._hgetall(_meta_key(request_id))
        if meta.get("tenant") != principal.tenant_id:
            return not_found
        state = "finished" if request_id in self.recent_terminal else "accepted"
        return _json_response(
            200,
            {
                "request_id": request_id,
                "tenant_id": principal.tenant_id,
                "status": state,
                "source": "gateway",
            },
        )

    # ---- WebSocket -------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        pending = self._pending.pop(ws, None)
        if pending is None:  # not an upgrade we checked (cannot happen)
            await ws.close(1008, "unauthorized")
            return
        principal, socket_id, session_id = pending
        wake = asyncio.Event()

        def on_overflow() -> None:
            self._spawn(self._close_slow(ws))

        outbox = Outbox(self.s.send_buffer, wake.set, on_overflow)
        conn = Conn(ws, principal, outbox, wake, id=socket_id, session_id=session_id)
        self.conns.add(conn)
        sender = asyncio.create_task(self._sender(conn))
        conn.outbox.put(
            protocol.hello(
                self.s.gateway_id,
                int(self.s.heartbeat_s * 1000),
                principal.tenant_id,
                self.s.default_model,
            )
        )
        try:
            async for frame in ws:
                if conn.outbox.overflowed:
                    break
                conn.received_at = time.monotonic()
                try:
                    msg = protocol.parse(frame, self.s.max_frame_bytes)
                except protocol.ProtocolError as exc:
                    self.metrics.invalid_frames += 1
                    conn.outbox.put(exc.frame())
                    continue
                except Exception:  # a parser bug must not end the socket (nor show a traceback)
                    log.exception("parsing a frame failed")
                    conn.outbox.put(protocol.error(protocol.INTERNAL, "internal error"))
                    continue
                try:
                    await self._dispatch(conn, msg)
                except Exception:
                    log.exception("frame handling failed")
                    # With the frame's client_ref, so that the client knows which submit failed
                    # (e.g. no Redis connection free within 5 s under a burst) and retries it.
                    conn.outbox.put(
                        protocol.error(
                            protocol.INTERNAL,
                            "internal error",
                            client_ref=getattr(msg, "client_ref", None),
                            retry_after_ms=1000,
                        )
                    )
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            self._disconnected(conn)

    async def _close_after_flush(self, conn: Conn, code: int, reason: str) -> None:
        for _ in range(100):
            if not conn.outbox.frames:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        await conn.ws.close(code, reason)

    async def _close_slow(self, ws: ServerConnection) -> None:
        """A socket fell `send_buffer` frames behind: close it (4008); if even the close frame
        cannot be written in time, drop the TCP connection."""
        self.metrics.send_buffer_overflows += 1
        try:
            await asyncio.wait_for(
                ws.close(protocol.CLOSE_SLOW_CONSUMER, "send buffer full: reconnect and resume"),
                3,
            )
        except (TimeoutError, ConnectionClosed):
            pass
        finally:
            if ws.transport is not None and not ws.transport.is_closing():
                ws.transport.abort()

    async def _sender(self, conn: Conn) -> None:
        outbox, ws = conn.outbox, conn.ws
        try:
            while True:
                if outbox.overflowed:
                    return
                if not outbox.frames:
                    conn.wake.clear()
                    try:
                        await asyncio.wait_for(conn.wake.wait(), self.s.heartbeat_s)
                    except TimeoutError:
                        outbox.put(protocol.heartbeat(_now_ms()))
                    continue
                n = 0
                while outbox.frames and n < 64 and not outbox.overflowed:
                    # Encoded here, not by websockets: a lone surrogate that slipped through
                    # (protocol.parse refuses them) must not make the send fail and kill the
                    # socket; it becomes "?". The same one encode either way.
                    frame = outbox.frames.popleft().encode("utf-8", "replace")
                    await ws.send(frame, text=True)
                    n += 1
                self.metrics.frames_sent += n
                await asyncio.sleep(0)  # let other sockets send too
        except ConnectionClosed:
            return

    def _disconnected(self, conn: Conn) -> None:
        self.conns.discard(conn)
        conn.outbox.closed = True
        conn.outbox.frames.clear()
        t = conn.principal.tenant_id
        assert self.quota is not None
        self._spawn(self.quota.close_socket(t, self._member(conn)))
        now = _now_ms()
        for rid, watch in conn.watches.items():
            self.router.remove(watch)
            task = conn.tasks.get(rid)
            if task is not None:
                task.cancel()
            if not watch.finished:
                grace = not conn.drained and not self.draining
                self._spawn(self._detach(rid, self._member(conn), t, now, grace))

    def _member(self, conn: Conn) -> str:
        return f"{self.s.gateway_id}/{conn.id}"

    async def _attach(self, request_id: str, conn: Conn) -> None:
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(_watchers_key(request_id), self._member(conn))
        pipe.expire(_watchers_key(request_id), META_TTL_S)
        pipe.hset(_meta_key(request_id), "attached_ms", _now_ms())
        await pipe.execute()

    async def _detach(
        self, request_id: str, member: str, tenant_id: str, since_ms: int, grace: bool
    ) -> None:
        """A socket stopped following a request; after the grace period, if nobody (on any
        replica) follows it, cancel it."""
        assert self.redis is not None
        rm: Any = self.redis.srem(_watchers_key(request_id), member)
        await rm
        if not grace:
            return
        await asyncio.sleep(self.s.grace_s)
        if self.router.watched(request_id) or request_id in self.recent_terminal:
            return
        card: Any = await self.redis.scard(_watchers_key(request_id))
        if int(card) > 0:
            return
        attached: Any = await self.redis.hget(_meta_key(request_id), "attached_ms")
        if attached is not None and int(attached) > since_ms:
            return
        await self._produce_cancel(request_id, tenant_id, "disconnect")
        self.metrics.grace_cancels += 1

    async def _produce_cancel(self, request_id: str, tenant_id: str, reason: str) -> None:
        assert self.producer is not None
        ev = codec.new_event(request_id, tenant_id, self.s.gateway_id)
        ev.cancel_requested.reason = reason
        fut = await self.producer.send(
            self.s.prompts_topic, codec.encode(ev), key=codec.key(ev), headers=codec.headers(ev)
        )
        await fut

    async def _dispatch(self, conn: Conn, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Ping):
            conn.outbox.put(msg.reply or protocol.pong(msg.data))
            return
        assert self.keys is not None
        principal = await self.keys.still_valid(conn.principal)
        reason = "API key revoked or expired"
        if principal is not None and conn.session_id is not None:
            assert self.sessions is not None
            found = await self.sessions.lookup(conn.session_id)  # slides its TTL, like any use
            if found is None or found[0] != principal.key_id:
                principal, reason = None, "session expired or signed out"
        if principal is None:
            conn.outbox.put(protocol.error(protocol.UNAUTHORIZED, reason))
            self._spawn(self._close_after_flush(conn, protocol.CLOSE_UNAUTHORIZED, "unauthorized"))
            return
        conn.principal = principal
        if isinstance(msg, protocol.Submit):
            await self._submit(conn, msg)
        elif isinstance(msg, protocol.Cancel):
            await self._cancel(conn, msg)
        else:
            await self._resume(conn, msg.request_id, msg.after_seq, msg.client_ref)

    # ---- submit / cancel / resume ------------------------------------------------------------

    async def _submit(self, conn: Conn, msg: protocol.Submit) -> None:
        # The root span of the request's trace (one per submit, whatever its outcome).
        with tracing.tracer().start_as_current_span(
            "submit",
            kind=SpanKind.SERVER,
            attributes={
                "llmstream.tenant_id": conn.principal.tenant_id,
                "llmstream.model": msg.model,
            },
        ):
            await self._accept_submit(conn, msg)

    async def _accept_submit(self, conn: Conn, msg: protocol.Submit) -> None:
        assert self.redis is not None and self.quota is not None and self.producer is not None
        p = conn.principal
        ref = msg.client_ref
        if self.draining:
            self.metrics.submits["draining"] += 1
            conn.outbox.put(
                protocol.error(protocol.OVERLOADED, "draining", client_ref=ref, retry_after_ms=500)
            )
            return
        if self._overloaded():
            self.metrics.submits["overloaded"] += 1
            conn.outbox.put(
                protocol.error(
                    protocol.OVERLOADED,
                    "gateway overloaded, retry later",
                    client_ref=ref,
                    retry_after_ms=1000,
                )
            )
            return
        max_tokens, capped = msg.max_tokens, None
        if max_tokens > p.limits.max_tokens_per_request:
            max_tokens, capped = p.limits.max_tokens_per_request, "tier"
        shed = self.s.shed_max_tokens
        if shed and max_tokens > shed and self._shedding():
            max_tokens, capped = shed, "load"
        request_id = "req_" + uuid.uuid4().hex
        trace.get_current_span().set_attribute("llmstream.request_id", request_id)
        idem_key = None
        if msg.idempotency_key:
            idem_key = _idem_key(p.tenant_id, msg.idempotency_key)
            created = await self.redis.set(idem_key, request_id, nx=True, ex=IDEMPOTENCY_TTL_S)
            if not created:
                existing: Any = await self.redis.get(idem_key)
                if existing:
                    rid = existing.decode() if isinstance(existing, bytes) else str(existing)
                    self.metrics.submits["idempotent"] += 1
                    # A concurrent first submit may still be reserving: give it a moment.
                    for _ in range(40):
                        if await self._meta(conn, rid) is not None:
                            break
                        await asyncio.sleep(0.025)
                    await self._resume(conn, rid, 0, ref, existing=True)
                    return
        estimate = protocol.estimate_prompt_tokens(msg)
        reserved = estimate + max_tokens
        ev = codec.new_event(request_id, p.tenant_id, self.s.gateway_id)
        at_ms = codec.event_time_ms(ev)
        decision = await self.quota.reserve(
            p.tenant_id, request_id, at_ms, at_ms, reserved, p.limits
        )
        if not decision.ok:
            if idem_key:
                await self.redis.delete(idem_key)
            self.metrics.submits["quota"] += 1
            self.metrics.quota_refusals[decision.limit or "unknown"] += 1
            conn.outbox.put(
                protocol.error(
                    protocol.QUOTA_EXCEEDED,
                    f"quota exceeded: {decision.limit}",
                    client_ref=ref,
                    retry_after_ms=decision.retry_after_ms,
                )
            )
            return
        partition = self.owned[self._rr % len(self.owned)]
        self._rr += 1
        s = ev.submitted
        s.model = msg.model
        if msg.prompt is not None:
            s.prompt.text = msg.prompt
        else:
            for m in msg.messages:
                s.prompt.chat.messages.add(role=m.role, content=m.content)
        if msg.temperature is not None:
            s.sampling.temperature = msg.temperature
        if msg.top_p is not None:
            s.sampling.top_p = msg.top_p
        if msg.seed is not None:
            s.sampling.seed = msg.seed
        s.sampling.stop.extend(msg.stop)
        s.max_tokens = max_tokens
        s.reply.topic = self.s.tokens_topic
        s.reply.partition = partition
        s.reply.gateway_id = self.s.gateway_id
        s.idempotency_key = msg.idempotency_key or ""
        s.estimated_prompt_tokens = estimate
        s.reserved_tokens = reserved
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            _meta_key(request_id),
            mapping={
                "tenant": p.tenant_id,
                "topic": self.s.tokens_topic,
                "partition": partition,
                "offset": self.low[partition],
                "submitted_ms": at_ms,
                "gateway": self.s.gateway_id,
                "attached_ms": at_ms,
            },
        )
        pipe.expire(_meta_key(request_id), META_TTL_S)
        pipe.sadd(_watchers_key(request_id), self._member(conn))
        pipe.expire(_watchers_key(request_id), META_TTL_S)
        await pipe.execute()
        watch = Watch(request_id, conn.outbox, 0, at_ms)
        if len(conn.watches) >= 256:
            for rid in [r for r, w in conn.watches.items() if w.finished]:
                del conn.watches[rid]
        conn.watches[request_id] = watch
        self.router.add(watch)
        self.inflight[request_id] = time.monotonic()
        received = conn.received_at
        watch.on_first_token = lambda: self.metrics.record_ttft(time.monotonic() - received)
        watch.on_done = lambda: self.metrics.record_e2e(time.monotonic() - received)
        conn.outbox.put(protocol.accepted(request_id, ref, max_tokens, capped=capped))
        # The prompt event carries this span's context: the worker and the model server
        # continue the request's trace from it.
        send_span = tracing.tracer().start_span(
            f"send {self.s.prompts_topic}",
            kind=SpanKind.PRODUCER,
            attributes=tracing.kafka_attributes("send", self.s.prompts_topic, key=request_id),
        )
        ev.trace.traceparent, ev.trace.tracestate = tracing.trace_context_of(send_span)
        try:
            fut = await self.producer.send(
                self.s.prompts_topic, codec.encode(ev), key=codec.key(ev), headers=codec.headers(ev)
            )
            sent = await asyncio.wait_for(fut, 30)
            send_span.set_attributes(
                {
                    "messaging.destination.partition.id": str(sent.partition),
                    "messaging.kafka.offset": sent.offset,
                }
            )
            send_span.end()
        except Exception as exc:
            send_span.record_exception(exc)
            send_span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            send_span.end()
            log.exception("producing a prompt failed")
            self.metrics.submits["failed"] += 1
            await self.quota.release(p.tenant_id, request_id, at_ms, reserved)
            if idem_key:
                await self.redis.delete(idem_key)
            await self.redis.delete(_meta_key(request_id))
            self.router.remove(watch)
            conn.watches.pop(request_id, None)
            self.inflight.pop(request_id, None)
            conn.outbox.put(
                protocol.error(
                    protocol.INTERNAL,
                    "could not queue the request",
                    request_id=request_id,
                    client_ref=ref,
                    retry_after_ms=1000,
                )
            )
            return
        self.metrics.submits["accepted"] += 1
        if telemetry.log_prompts():
            with telemetry.log_context(request_id=request_id, tenant_id=p.tenant_id):
                log.info(
                    "prompt",
                    extra=telemetry.fields(
                        model=msg.model,
                        prompt=msg.prompt,
                        messages=[{"role": m.role, "content": m.content} for m in msg.messages],
                    ),
                )

    async def _hgetall(self, key: str) -> dict[str, str]:
        assert self.redis is not None
        raw: Any = await self.redis.hgetall(key)
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): (
                v.decode() if isinstance(v, bytes) else str(v)
            )
            for k, v in raw.items()
        }

    async def _meta(self, conn: Conn, request_id: str) -> dict[str, str] | None:
        if len(request_id) > 128:
            return None
        meta = await self._hgetall(_meta_key(request_id))
        if not meta or meta.get("tenant") != conn.principal.tenant_id:
            return None
        return meta

    async def _cancel(self, conn: Conn, msg: protocol.Cancel) -> None:
        meta = await self._meta(conn, msg.request_id)
        if meta is None:
            conn.outbox.put(
                protocol.error(
                    protocol.NOT_FOUND,
                    "no such request",
                    request_id=msg.request_id,
                    client_ref=msg.client_ref,
                )
            )
            return
        await self._produce_cancel(msg.request_id, conn.principal.tenant_id, "client")

    async def _resume(
        self,
        conn: Conn,
        request_id: str,
        after_seq: int,
        client_ref: str | None,
        existing: bool = False,
    ) -> None:
        """Follow a request from `after_seq` on: replay its events from its reply partition,
        then continue live (from the own consumer, or a borrowed partition of another
        replica's)."""
        assert self.redis is not None
        meta = await self._meta(conn, request_id)
        if meta is None:
            conn.outbox.put(
                protocol.error(
                    protocol.NOT_FOUND,
                    "no such request",
                    request_id=request_id,
                    client_ref=client_ref,
                )
            )
            return
        if self._resume_slots.locked():
            conn.outbox.put(
                protocol.error(
                    protocol.OVERLOADED,
                    "too many resumes in progress",
                    request_id=request_id,
                    client_ref=client_ref,
                    retry_after_ms=1000,
                )
            )
            return
        old = conn.watches.pop(request_id, None)
        if old is not None:
            self.router.remove(old)
            task = conn.tasks.pop(request_id, None)
            if task is not None:
                task.cancel()
        await self._attach(request_id, conn)
        topic = meta["topic"]
        partition = int(meta["partition"])
        start = int(meta["offset"])
        owned = topic == self.s.tokens_topic and partition in self.owned
        watch = Watch(
            request_id,
            conn.outbox,
            after_seq,
            int(meta["submitted_ms"]),
            catching_up=True,
            borrowed=None if owned else (topic, partition),
        )
        conn.watches[request_id] = watch
        if existing:  # an idempotent resubmit is answered like any submit
            conn.outbox.put(protocol.accepted(request_id, client_ref, 0, existing=True))
        # Live events are parked from now on; the catch-up replays up to the end offset taken
        # after this point, so replay + live overlap and dedup by seq leaves no gap.
        self.router.add(watch)
        tp = TopicPartition(topic, partition)
        if not owned:
            try:
                await self._borrow(tp)
            except Exception:
                log.exception("borrowing a partition failed")
                self.router.remove(watch)
                del conn.watches[request_id]
                conn.outbox.put(
                    protocol.error(
                        protocol.INTERNAL,
                        "resume failed, try again",
                        request_id=request_id,
                        client_ref=client_ref,
                        retry_after_ms=1000,
                    )
                )
                return
        self.metrics.resumes["owned" if owned else "borrowed"] += 1
        conn.tasks[request_id] = asyncio.create_task(self._catch_up(conn, watch, tp, start))

    async def _catch_up(self, conn: Conn, watch: Watch, tp: TopicPartition, start: int) -> None:
        key = watch.request_id.encode()
        async with self._resume_slots:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.s.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                fetch_max_wait_ms=20,
                max_partition_fetch_bytes=256 * 1024,
                client_id=f"{self.s.gateway_id}-resume",
            )
            try:
                await consumer.start()
                consumer.assign([tp])
                consumer.seek(tp, start)
                end = (await consumer.end_offsets([tp]))[tp]
                while not watch.finished and not conn.outbox.closed:
                    if await consumer.position(tp) >= end:
                        break
                    while len(conn.outbox) > conn.outbox.limit // 2 and not conn.outbox.closed:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)  # replay at the socket's pace
                    batch = await consumer.getmany(tp, timeout_ms=200, max_records=500)
                    for rec in batch.get(tp, []):
                        if rec.key != key:
                            continue
                        try:
                            watch.apply(codec.decode(rec.value))
                        except codec.DecodeError:
                            continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("resume read failed")
                # Without the replay the stream would have a gap: drop the watch, ask again.
                self.router.remove(watch)
                if conn.watches.get(watch.request_id) is watch:
                    del conn.watches[watch.request_id]
                conn.tasks.pop(watch.request_id, None)
                conn.outbox.put(
                    protocol.error(
                        protocol.INTERNAL,
                        "resume failed, try again",
                        request_id=watch.request_id,
                        retry_after_ms=1000,
                    )
                )
                return
            finally:
                await consumer.stop()
        watch.end_catch_up()
        if watch.finished:
            self.router.remove(watch)
        conn.tasks.pop(watch.request_id, None)

    # ---- introspection for tests ---------------------------------------------------------------

    def consumer_assignment(self) -> set[int]:
        assert self.consumer is not None
        return {tp.partition for tp in self.consumer.assignment()}

    def borrowed_partitions(self) -> set[int]:
        assert self.borrow_consumer is not None
        return {tp.partition for tp in self.borrow_consumer.assignment()}
