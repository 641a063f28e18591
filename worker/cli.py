"""`llmstream worker`: run a worker replica (prompts -> gRPC Generate -> token events)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Sequence

from llmstream import config, telemetry, topics, tracing
from worker.service import Settings, serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmstream worker",
        description="Consume prompts, stream each from a model server over gRPC and produce "
        "its token events to the reply partition. See docs/worker.md. Defaults come from "
        "LLMSTREAM_* variables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--id", default=config.get("WORKER_ID"), help="worker id (empty: host-pid)")
    p.add_argument("--group", default=config.get("WORKER_GROUP"), help="consumer group")
    p.add_argument(
        "--model-servers",
        default=",".join(config.model_servers()),
        help="comma-separated host:port replicas",
    )
    p.add_argument("--max-inflight", type=int, default=config.get_int("WORKER_MAX_INFLIGHT"))
    p.add_argument("--coalesce-ms", type=float, default=float(config.get("WORKER_COALESCE_MS")))
    p.add_argument("--coalesce-bytes", type=int, default=config.get_int("WORKER_COALESCE_BYTES"))
    p.add_argument("--max-tokens", type=int, default=config.get_int("WORKER_MAX_TOKENS"))
    p.add_argument("--timeout-ms", type=int, default=config.get_int("WORKER_TIMEOUT_MS"))
    p.add_argument("--retries", type=int, default=config.get_int("WORKER_RETRIES"))
    p.add_argument("--backoff-ms", type=float, default=float(config.get("WORKER_BACKOFF_MS")))
    p.add_argument(
        "--drain-timeout-s", type=float, default=float(config.get("WORKER_DRAIN_TIMEOUT_S"))
    )
    p.add_argument(
        "--session-timeout-ms", type=int, default=config.get_int("WORKER_SESSION_TIMEOUT_MS")
    )
    p.add_argument("--blocklist", default=config.get("WORKER_BLOCKLIST"))
    p.add_argument(
        "--metrics-port",
        type=int,
        default=config.get_int("WORKER_METRICS_PORT"),
        help="serve Prometheus /metrics on this port (0: off)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--log-level", default=config.get("LOG_LEVEL"))
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    servers = [s.strip() for s in args.model_servers.split(",") if s.strip()]
    if not servers:
        raise config.ConfigError("no model servers: set LLMSTREAM_MODEL_SERVERS")
    if args.max_inflight < 1:
        raise config.ConfigError("--max-inflight must be at least 1")
    return Settings(
        bootstrap=config.kafka_bootstrap(),
        prompts_topic=topics.prompts(),
        tokens_topic=topics.tokens(),
        dlq_topic=topics.dlq(),
        group=args.group,
        worker_id=args.id or f"worker-{socket.gethostname()}-{os.getpid()}",
        model_servers=servers,
        max_inflight=args.max_inflight,
        coalesce_ms=args.coalesce_ms,
        coalesce_bytes=args.coalesce_bytes,
        max_tokens=args.max_tokens,
        default_timeout_ms=args.timeout_ms,
        retries=args.retries,
        backoff_base_ms=args.backoff_ms,
        drain_timeout_s=args.drain_timeout_s,
        session_timeout_ms=args.session_timeout_ms,
        blocklist=args.blocklist,
        model_server_tls_ca=config.get("WORKER_MODEL_SERVER_TLS_CA"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from(args)
        tracing.setup_tracing("worker")
    except config.ConfigError as exc:
        print(f"llmstream worker: {exc}")
        return 2
    telemetry.setup_logging("worker", args.log_level)
    if args.metrics_port:
        try:
            telemetry.setup_metrics("worker", port=args.metrics_port, host=args.metrics_host)
        except OSError as exc:
            print(f"llmstream worker: metrics port {args.metrics_port}: {exc}")
            return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130
