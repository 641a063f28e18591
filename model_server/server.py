"""The gRPC server: services, health, reflection, limits, drain and signals.

Lifecycle: bind the port (health NOT_SERVING) -> load and warm up every configured model ->
SERVING. On SIGTERM (or ``drain()``): NOT_SERVING, new streams are refused with UNAVAILABLE,
in-flight streams get ``drain_timeout_s`` to finish, then are cancelled (finish reason
CANCELLED, message "shutdown"), then the server stops. A second SIGTERM/SIGINT skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmstream.runner import Shutdown
from llmstream.v1 import (
    model_admin_pb2,
    model_admin_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
)
from model_server.admin import AdminTokens, BearerAuth, ModelAdminService
from model_server.admin_options import AdminPolicy
from model_server.decode_guard import DecodeGuard
from model_server.metrics import ServerMetrics
from model_server.registry import EngineFactory, ModelRegistry, ModelSpec, default_factory
from model_server.service import ModelService, ServerState
from model_server.types import ModelLimits

log = logging.getLogger(__name__)

MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
ADMIN_SERVICE = model_admin_pb2.DESCRIPTOR.services_by_name["ModelAdminService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    models: Sequence[ModelSpec] = ()
    # Largest gRPC message accepted or sent; larger ones fail with RESOURCE_EXHAUSTED.
    max_message_bytes: int = 4 * 1024 * 1024
    # Concurrent RPCs of all kinds; more are refused by gRPC with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 4096
    drain_timeout_s: float = 30.0
    start_timeout_s: float = 10.0
    health_interval_s: float = 5.0
    # ModelAdminService: off unless asked for; then on its own port, every call with a bearer
    # token (model_server/admin.py) and LoadModel options allow-listed (`admin_policy`).
    admin: bool = False
    admin_host: str = "127.0.0.1"
    admin_port: int = 50061
    admin_tokens: AdminTokens = field(default_factory=AdminTokens)
    admin_policy: AdminPolicy = field(default_factory=AdminPolicy)
    # Server reflection on both ports (grpcurl without .proto files); off in production.
    reflection: bool = True
    default_limits: ModelLimits = field(default_factory=ModelLimits)
    # Keepalive: notice dead clients (a crashed worker) so that their sequences are aborted.
    keepalive_time_ms: int = 20_000
    keepalive_timeout_ms: int = 10_000
    # PEM files: serve gRPC over TLS (workers need LLMSTREAM_WORKER_MODEL_SERVER_TLS_CA).
    tls_cert: str = ""
    tls_key: str = ""


def tls_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    """Server credentials from PEM files (read once at start)."""
    with open(key_path, "rb") as key, open(cert_path, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


class ModelServer:
    def __init__(
        self,
        config: Settings,
        *,
        metrics: ServerMetrics | None = None,
        engine_factory: EngineFactory = default_factory,
    ) -> None:
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.state = ServerState(start_timeout_s=config.start_timeout_s)
        self._health_dirty = asyncio.Event()
        self.registry = ModelRegistry(engine_factory, on_change=self._health_dirty.set)
        self.metrics.bind(self._load_stats, self._model_infos)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._admin_server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.port = 0
        self.admin_port = 0  # 0: the admin RPC is not served

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> int:
        """Bind and start serving (NOT_SERVING until the models are loaded); returns the port.
        With admin on, the admin port is bound too (`admin_port`)."""
        cfg = self.config
        server = grpc.aio.server(
            options=self._channel_options(),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
            interceptors=[DecodeGuard()],  # undecodable requests: INVALID_ARGUMENT
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self.registry, self.metrics, self.state), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            names = [MODEL_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, server)
        self.port = self._bind(server, cfg.host, cfg.port)
        admin = await self._admin_server_of(cfg) if cfg.admin else None
        if admin is not None:
            self.admin_port = self._bind(admin, cfg.admin_host, cfg.admin_port)
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        if admin is not None:
            await admin.start()
            self._admin_server = admin
        log.info(
            "model server listening on %s:%d (%s); admin %s",
            cfg.host,
            self.port,
            "TLS" if cfg.tls_cert else "plaintext",
            f"on {cfg.admin_host}:{self.admin_port}" if admin is not None else "off",
        )
        self._tasks.append(asyncio.create_task(self._health_updater()))
        return self.port

    def _channel_options(self) -> list[tuple[str, int]]:
        cfg = self.config
        return [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.keepalive_time_ms", cfg.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", cfg.keepalive_timeout_ms),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]

    async def _admin_server_of(self, cfg: Settings) -> grpc.aio.Server:
        """The admin port's server: every call needs the bearer token, reflection included
        (when on); the tokens are read now, so that an unusable one stops the start."""
        await asyncio.to_thread(cfg.admin_tokens.load)
        admin = grpc.aio.server(
            options=self._channel_options(),
            maximum_concurrent_rpcs=64,
            interceptors=[BearerAuth(cfg.admin_tokens), DecodeGuard()],
        )
        model_admin_pb2_grpc.add_ModelAdminServiceServicer_to_server(
            ModelAdminService(self.registry, self.state, cfg.default_limits, cfg.admin_policy),
            admin,
        )
        if cfg.reflection:
            reflection.enable_server_reflection([ADMIN_SERVICE, reflection.SERVICE_NAME], admin)
        return admin

    def _bind(self, server: grpc.aio.Server, host: str, port: int) -> int:
        cfg = self.config
        address = f"{host}:{port}"
        if cfg.tls_cert:
            bound = server.add_secure_port(address, tls_credentials(cfg.tls_cert, cfg.tls_key))
        else:
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot bind {address}")
        return int(bound)

    async def load_models(self) -> None:
        for spec in self.config.models:
            await self.registry.load(spec)
        self._health_dirty.set()
        if self.config.health_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._health_monitor()))

    async def drain(self, timeout_s: float | None = None) -> int:
        """Refuse new streams, let in-flight ones finish up to the timeout, cancel the rest.
        Returns how many were cancelled."""
        self.state.draining = True
        await self._set_health(NOT_SERVING)
        timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
        in_flight = sum(h.in_flight for h in self.registry.handles())
        log.info("draining: %d streams in flight, timeout %.1fs", in_flight, timeout)
        cancelled = await self.registry.drain(timeout, "shutdown")
        if cancelled:
            log.warning("drain timeout: cancelled %d streams", cancelled)
        return cancelled

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._stopped.is_set():
            return
        self.state.draining = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._admin_server is not None:
            await self._admin_server.stop(grace_s)
        if self._server is not None:
            await self._server.stop(grace_s)
        await self.registry.close()
        self._stopped.set()
        log.info("model server stopped")

    async def shutdown(self) -> None:
        """Drain, then stop (what SIGTERM does)."""
        started = time.monotonic()
        await self.drain()
        await self.stop()
        log.info("shutdown took %.2fs", time.monotonic() - started)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def follow(self, shutdown: Shutdown) -> None:
        """The process's signals: the first drains then stops, a second cancels the streams
        still in flight at once (the drain then ends early)."""
        await shutdown.requested.wait()
        forced = asyncio.create_task(shutdown.forced.wait())
        draining = asyncio.create_task(self.shutdown())
        await asyncio.wait({forced, draining}, return_when=asyncio.FIRST_COMPLETED)
        if forced.done() and not draining.done():
            log.warning("cancelling in-flight streams now")
            for h in self.registry.handles():
                h.cancel_all("shutdown")
        forced.cancel()
        await draining

    # -- health ----------------------------------------------------------------------------
    def serving_status(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        if self.state.draining or not self.registry.serving:
            return NOT_SERVING
        return SERVING

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", MODEL_SERVICE):
            await self.health.set(name, status)

    async def _health_updater(self) -> None:
        while True:
            await self._health_dirty.wait()
            self._health_dirty.clear()
            await self._set_health(self.serving_status())

    async def _health_monitor(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.registry.check_health()
            except Exception:
                log.exception("health check failed")

    # -- metrics sources -------------------------------------------------------------------
    def _load_stats(self) -> list[tuple[str, int, int]]:
        out = []
        for h in self.registry.handles():
            try:
                out.append((h.name, h.engine.running, h.engine.waiting))
            except Exception:  # an engine being torn down
                continue
        return out

    def _model_infos(self) -> list[tuple[str, str, str, str]]:
        return [(h.name, h.version, h.spec.engine, h.state.value) for h in self.registry.handles()]


async def serve(config: Settings, shutdown: Shutdown, metrics: ServerMetrics | None = None) -> int:
    """Run until SIGTERM/SIGINT (`shutdown`); returns the process exit code."""
    server = ModelServer(config, metrics=metrics)
    signals = asyncio.create_task(server.follow(shutdown))
    try:
        return await _serve(server)
    finally:
        if not signals.done():
            signals.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await signals


async def _serve(server: ModelServer) -> int:
    await server.start()
    loading = asyncio.create_task(server.load_models())
    stopped = asyncio.create_task(server.wait_stopped())
    await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # a signal arrived while the models were loading
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await loading
        await server.stop(0)
        return 0
    if loading.exception() is not None:
        log.error("loading models failed: %s", loading.exception())
        stopped.cancel()
        await server.stop(0)
        return 1
    log.info("serving models: %s", ", ".join(h.name for h in server.registry.current()))
    await stopped
    return 0
