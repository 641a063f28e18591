"""`llmstream worker`: run a worker replica (prompts -> gRPC Generate -> token events)."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence

from llmstream import config, runner, topics
from worker.service import Worker
from worker.settings import Settings


def parser() -> argparse.ArgumentParser:
    """Flags default to the LLMSTREAM_* variables (a malformed one raises ConfigError)."""
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
    p.add_argument("--coalesce-ms", type=float, default=config.get_float("WORKER_COALESCE_MS"))
    p.add_argument("--coalesce-bytes", type=int, default=config.get_int("WORKER_COALESCE_BYTES"))
    p.add_argument("--max-tokens", type=int, default=config.get_int("WORKER_MAX_TOKENS"))
    p.add_argument("--timeout-ms", type=int, default=config.get_int("WORKER_TIMEOUT_MS"))
    p.add_argument("--retries", type=int, default=config.get_int("WORKER_RETRIES"))
    p.add_argument("--backoff-ms", type=float, default=config.get_float("WORKER_BACKOFF_MS"))
    p.add_argument(
        "--drain-timeout-s", type=float, default=config.get_float("WORKER_DRAIN_TIMEOUT_S")
    )
    p.add_argument(
        "--session-timeout-ms", type=int, default=config.get_int("WORKER_SESSION_TIMEOUT_MS")
    )
    p.add_argument("--blocklist", default=config.get("WORKER_BLOCKLIST"))
    p.add_argument(
        "--tier-check",
        action=argparse.BooleanOptionalAction,
        default=config.get_bool("WORKER_TIER_CHECK"),
        help="refuse submits beyond the tenant's tier (reads PostgreSQL: LLMSTREAM_DATABASE_URL)",
    )
    p.add_argument("--tier-cache-s", type=float, default=config.get_float("WORKER_TIER_CACHE_S"))
    p.add_argument(
        "--tier-stale-s",
        type=float,
        default=config.get_float("WORKER_TIER_STALE_S"),
        help="while PostgreSQL is unreachable, a cached tier up to this old is still used",
    )
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
    if args.tier_cache_s <= 0 or args.tier_stale_s < 0:
        raise config.ConfigError("--tier-cache-s must be positive and --tier-stale-s not negative")
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
        tier_check=args.tier_check,
        # The tier check needs PostgreSQL: no URL is a configuration error (exit 2).
        database_url=config.database_url() if args.tier_check else "",
        tier_cache_s=args.tier_cache_s,
        tier_stale_s=args.tier_stale_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 after a drain, 1 after a fatal error or a dead background loop (the
    orchestrator restarts the process), 2 for a configuration error."""
    try:
        args = parser().parse_args(argv)
        settings = settings_from(args)
    except config.ConfigError as exc:
        return runner.fail("worker", str(exc))
    proc = runner.ServiceProcess(
        name="worker",
        log_level=args.log_level,
        metrics=runner.Listen(
            args.metrics_host, args.metrics_port, "metrics", "LLMSTREAM_WORKER_METRICS_PORT"
        ),
    )

    async def serve(shutdown: runner.Shutdown) -> int:
        return await Worker(settings, shutdown).run()

    return runner.run(proc, serve)
