"""The gateway process: composes its parts, runs its loops, starts, drains and stops.

Where each responsibility lives (docs/gateway.md has the full table):
- clients (Kafka, Redis, PostgreSQL): gateway/resources.py
- admission of a submit (caps, idempotency, quota, the `submitted` event): gateway/admission.py
- token events to sockets (owned, borrowed and catch-up readers; resume): gateway/feed.py
- the WebSocket protocol and its connections: gateway/protocol.py, gateway/ws.py
- HTTP routes: gateway/http.py; request metadata in Redis: gateway/store.py
- errors: gateway/errors.py (one type; each front end renders it once)

One aiohttp server on the gateway's port serves the WebSocket, http.py's routes and the routes
of `ROUTE_PROVIDERS` (other front ends, e.g. the OpenAI-compatible API).

Background loops (owned and borrowed readers, housekeeping, prompt lag) run under a
`Supervisor`: a loop that dies is logged and turns `/readyz` to 503, so an orchestrator
restarts the process instead of it silently no longer delivering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from psycopg_pool import AsyncConnectionPool

from gateway import auth, readiness
from gateway.admission import Admission, Load, Policy
from gateway.cancels import Cancels
from gateway.feed import TokenFeed
from gateway.follow import Followers
from gateway.http import AccessLog, HttpRoutes, metrics, render_errors
from gateway.inflight import Inflight
from gateway.limits import FrameLimits
from gateway.metrics import GatewayMetrics
from gateway.models import Models
from gateway.openai import api_router
from gateway.prompts import PromptWriter
from gateway.resources import Resources
from gateway.settings import Settings
from gateway.store import RequestStore, now_ms
from gateway.tasks import TaskSet
from gateway.ws import SOCKET_LEASE_MS, Conn, WebSocketFrontEnd
from llmstream import kafka, quota_keys, telemetry
from llmstream.supervisor import Supervisor

log = logging.getLogger("gateway")

# At stop, how long HTTP handlers still running (after the sockets were closed) get to end
# before they are cancelled; how long a readiness probe may take.
CLOSE_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 1.0


def prompt_lag(ends: Mapping[Any, int], committed: Mapping[Any, Any]) -> int:
    """Prompts written but not yet finished (committed) by the workers' group."""
    lag = 0
    for tp, end in ends.items():
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        lag += max(0, end - done)
    return lag


async def _probe(check: Awaitable[object]) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await check
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


async def _select_one(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")


@dataclass(frozen=True, kw_only=True)
class Parts:
    """What a started gateway is made of; what a route provider builds its front end from."""

    settings: Settings
    resources: Resources  # the clients (Kafka, Redis, PostgreSQL)
    admission: Admission  # submits
    feed: TokenFeed  # token events to watches: follow, resume, catch_up
    models: Models  # the model catalog: served models and their limits
    prompts: PromptWriter  # cancel_requested events
    cancels: Cancels  # a client's cancel: written once, not for ended requests
    limits: FrameLimits  # rate limits of cancels and resumes per tenant (and socket)
    followers: Followers  # watchers of a request, the disconnect grace period
    inflight: Inflight
    metrics: GatewayMetrics
    tasks: TaskSet  # one-off background tasks, cancelled at stop
    draining: Callable[[], bool]  # SIGTERM received: refuse new streams
    sockets: WebSocketFrontEnd
    http: HttpRoutes

    @property
    def store(self) -> RequestStore:  # request metadata: lookup (tenant-checked)
        return self.resources.store

    @property
    def authenticator(self) -> auth.Authenticator:  # credentials -> principal, re-checks
        return self.resources.auth


# A front end served on the gateway's port besides the WebSocket and http.py's routes (the
# OpenAI-compatible API): adds its routes (and, if it needs them, middlewares and on_shutdown
# callbacks) to the app before it starts. docs/gateway.md, "Adding HTTP routes".
RouteProvider = Callable[[web.Application, Parts], None]
ROUTE_PROVIDERS: tuple[RouteProvider, ...] = (api_router.add_routes,)


class Gateway:
    def __init__(
        self, settings: Settings, route_providers: Sequence[RouteProvider] = ROUTE_PROVIDERS
    ) -> None:
        self.s = settings
        self.route_providers = route_providers
        self.inflight = Inflight()
        self.conns: set[Conn] = set()
        self.metrics = GatewayMetrics(
            settings.gateway_id, lambda: len(self.conns), lambda: len(self.inflight)
        )
        self.supervisor = Supervisor("gateway")
        self.tasks = TaskSet()
        self.draining = False
        self.prompt_lag = 0
        self._parts: Parts | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._probes = readiness.ProbeCache(self._probe)

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("the gateway is not started")
        return self._parts

    @property
    def admission(self) -> Admission:
        return self.parts.admission

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        # /metrics is served by the gateway's own server (GATEWAY_METRICS_PORT), so the
        # provider is needed however the gateway is started; a no-op if one exists already.
        telemetry.setup_metrics("gateway")
        res = await Resources.open(self.s)
        try:
            self._parts = await self._compose(res)
        except BaseException:
            await res.close()
            raise
        try:
            await self._run(self._parts)
        except BaseException:
            await self.stop()
            raise

    async def _compose(self, res: Resources) -> Parts:
        s = self.s
        count = len(await res.producer.partitions_for(s.tokens_topic))
        feed = TokenFeed(
            connection=res.connection,
            topic=s.tokens_topic,
            gateway_id=s.gateway_id,
            owned_reader=res.owned_reader,
            borrow_reader=res.borrow_reader,
            max_resumes=s.max_resumes,
            inflight=self.inflight,
            quota=res.quota,
            store=res.store,
            metrics=self.metrics,
            tasks=self.tasks,
        )
        await feed.start(s.owned_partitions(count))
        prompts = PromptWriter(res.producer, s.prompts_topic, s.gateway_id)
        models = Models.following(res.connection, s.models_topic, s.gateway_id)
        admission = Admission(
            gateway_id=s.gateway_id,
            policy=Policy.from_settings(s),
            load=lambda: Load(len(self.inflight), self.prompt_lag, self.draining),
            quota=res.quota,
            store=res.store,
            prompts=prompts,
            next_route=feed.next_route,
            inflight=self.inflight,
            metrics=self.metrics,
            models=models.view,
        )
        followers = Followers(
            store=res.store,
            router=feed.router,
            inflight=self.inflight,
            prompts=prompts,
            metrics=self.metrics,
            tasks=self.tasks,
            grace_s=s.grace_s,
        )
        cancels = Cancels(
            store=res.store, prompts=prompts, inflight=self.inflight, metrics=self.metrics
        )
        limits = FrameLimits(time.monotonic)
        sockets = WebSocketFrontEnd(
            settings=s,
            conns=self.conns,
            metrics=self.metrics,
            authenticator=res.auth,
            admission=admission,
            feed=feed,
            followers=followers,
            store=res.store,
            cancels=cancels,
            limits=limits,
            quota=res.quota,
            tasks=self.tasks,
            draining=lambda: self.draining,
        )
        http = HttpRoutes(
            settings=s,
            resources=res,
            sockets=sockets,
            inflight=self.inflight,
            readiness=self.readiness,
        )
        return Parts(
            settings=s,
            resources=res,
            admission=admission,
            feed=feed,
            models=models,
            prompts=prompts,
            cancels=cancels,
            limits=limits,
            followers=followers,
            inflight=self.inflight,
            metrics=self.metrics,
            tasks=self.tasks,
            draining=lambda: self.draining,
            sockets=sockets,
            http=http,
        )

    def _app(self, parts: Parts) -> web.Application:
        # client_max_size: the largest body `request.read()`/`.json()` accept (413 above).
        app = web.Application(client_max_size=self.s.max_body_bytes, middlewares=[render_errors])
        parts.http.add_routes(app)
        for add_routes in self.route_providers:
            add_routes(app, parts)

        async def close_sockets(_app: web.Application) -> None:
            await parts.sockets.close_all()

        app.on_shutdown.append(close_sockets)
        return app

    async def _run(self, parts: Parts) -> None:
        s, res, feed = self.s, parts.resources, parts.feed
        self.supervisor.spawn(feed.run_owned(), "owned tokens reader")
        self.supervisor.spawn(feed.run_borrowed(), "borrowed tokens reader")
        self.supervisor.spawn(parts.models.run(), "model catalog")
        self.supervisor.spawn(self._housekeeping(parts), "housekeeping")
        if res.admin is not None:
            self.supervisor.spawn(self._watch_prompt_lag(res, res.admin), "prompt lag")
        self._runner = web.AppRunner(
            self._app(parts),
            access_log_class=AccessLog,
            access_log=logging.getLogger("gateway.access"),
            shutdown_timeout=CLOSE_TIMEOUT_S,
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, s.host, s.port, ssl_context=s.ssl_context()).start()
        if s.port == 0:
            s.port = self._runner.addresses[0][1]
        if s.metrics_port:
            # Its own port, never the public one (scraped from inside the deployment).
            app = web.Application()
            app.router.add_get("/metrics", metrics)
            self._metrics_runner = web.AppRunner(app, access_log=None)
            await self._metrics_runner.setup()
            await web.TCPSite(self._metrics_runner, s.host, s.metrics_port).start()
        log.info(
            "gateway listening",
            extra=telemetry.fields(
                port=s.port, partitions=feed.owned, id=s.gateway_id, tls=bool(s.tls_cert)
            ),
        )

    async def drain(self) -> None:
        """SIGTERM: refuse new sockets, close open ones with 1012 (clients reconnect elsewhere
        and resume; their requests keep running), then stop."""
        self.draining = True
        if self._parts is not None:
            self._parts.sockets.drain()
        end = time.monotonic() + self.s.drain_s
        while self.conns and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        """Stop listening, close the sockets still open (1001), end the HTTP handlers, then the
        loops and the clients."""
        self.draining = True
        runner, self._runner = self._runner, None
        for server in (runner, self._metrics_runner):
            if server is None:
                continue
            try:
                await server.cleanup()
            except Exception:
                log.warning("stopping the server failed", exc_info=True)
        self._metrics_runner = None
        await self.supervisor.stop()
        await self.tasks.cancel_all()
        if self._parts is not None:
            await self._parts.resources.close()

    # ---- loops -------------------------------------------------------------------------------

    async def _housekeeping(self, parts: Parts) -> None:
        """Refresh this replica's socket leases (tenant socket caps); forget in-flight requests
        whose terminal event never came within the stream lease (so the load-shedding count
        cannot leak)."""
        lease_s = quota_keys.DEFAULT_STREAM_LEASE_MS / 1000
        while True:
            await asyncio.sleep(SOCKET_LEASE_MS / 3000)
            try:
                await parts.resources.quota.refresh_sockets(
                    parts.sockets.leases(), now_ms() + SOCKET_LEASE_MS
                )
            except Exception:
                log.warning("socket lease refresh failed", exc_info=True)
            self.inflight.expire(lease_s)

    async def _watch_prompt_lag(self, res: Resources, admin: AIOKafkaAdminClient) -> None:
        """Keep `prompt_lag`: prompts written but not yet finished by the workers."""
        topic = self.s.prompts_topic
        while True:
            try:
                parts = await res.producer.partitions_for(topic)
                tps = [TopicPartition(topic, p) for p in sorted(parts)]
                ends = await kafka.end_offsets(res.owned_reader, tps)
                committed = await asyncio.wait_for(
                    admin.list_consumer_group_offsets(self.s.worker_group, partitions=tps),
                    kafka.CALL_TIMEOUT_S,
                )
                self.prompt_lag = self.metrics.prompt_lag = prompt_lag(ends, committed)
            except Exception:
                log.warning("prompt lag unknown", exc_info=True)
            await asyncio.sleep(self.s.lag_interval_s)

    # ---- readiness and introspection ---------------------------------------------------------

    async def _probe(self) -> dict[str, str]:
        """The dependency probes of `/readyz` (run through `ProbeCache`: at most once a
        second whatever the request rate)."""
        res = self.parts.resources
        redis_ping: Any = res.redis.ping()
        return {
            "redis": await _probe(redis_ping),
            "postgres": await _probe(_select_one(res.postgres)),
            "kafka": await _probe(res.producer.partitions_for(self.s.tokens_topic)),
        }

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """`/readyz`: ready when Redis, PostgreSQL and Kafka answer (probed at most once per
        `readiness.INTERVAL_S`), this replica reads its partitions, no loop died (the `loops`
        check appears only then) and it is not draining."""
        checks = await self._probes.checks()
        if checks["kafka"] == "ok" and not self.parts.feed.owned_assignment():
            checks["kafka"] = "error: no partitions"
        if not self.supervisor.healthy:
            checks["loops"] = "error: " + "; ".join(self.supervisor.failures)
        ok = all(v == "ok" for v in checks.values()) and not self.draining
        return ok, checks

    def consumer_assignment(self) -> set[int]:
        return self.parts.feed.owned_assignment()

    def borrowed_partitions(self) -> set[int]:
        return self.parts.feed.borrowed_assignment()
