"""`llmstream aggregator`: run the aggregator, or rebuild the Redis quota counters."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import psycopg
import redis.asyncio as aioredis

from aggregator.quota_settlement import QuotaSettler, rebuild_from_postgres
from aggregator.service import Settings, serve
from aggregator.store import ProjectionStore
from llmstream import config, migrate, quota_keys, runner, topics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmstream aggregator",
        description="Project the prompts and tokens topics into PostgreSQL (requests, usage "
        "ledger, daily rollup) exactly once and settle quota reservations in Redis. "
        "See docs/aggregator.md.",
    )
    p.add_argument("--group", default=config.get("AGGREGATOR_GROUP"), help="consumer group")
    p.add_argument(
        "--topics",
        nargs="+",
        default=None,
        help="topics to consume (default: the prompts and tokens topics)",
    )
    p.add_argument(
        "--batch-max",
        type=int,
        default=config.get_int("AGGREGATOR_BATCH_MAX"),
        help="most records per PostgreSQL transaction",
    )
    p.add_argument(
        "--instance-id",
        default=config.get("AGGREGATOR_INSTANCE_ID"),
        help="Kafka static membership id (restarts keep their partitions)",
    )
    p.add_argument(
        "--session-timeout-ms",
        type=int,
        default=10_000,
        help="Kafka group session timeout (a dead replica's partitions move after it)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=config.get_int("AGGREGATOR_METRICS_PORT"),
        help="serve Prometheus /metrics on this port (0: off)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the /metrics server (0.0.0.0 in containers)",
    )
    p.add_argument(
        "--no-dlq", action="store_true", help="log undecodable records without parking them"
    )
    p.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start")
    p.add_argument(
        "--rebuild-quota",
        action="store_true",
        help="recompute the Redis quota counters of the current windows from PostgreSQL, "
        "then exit (after losing Redis; drain the gateways first)",
    )
    return p


async def _rebuild_quota(group: str) -> int:
    client = aioredis.from_url(config.redis_url(), socket_timeout=10, socket_connect_timeout=5)
    try:
        async with await psycopg.AsyncConnection.connect(
            config.database_url(), autocommit=True, connect_timeout=10
        ) as conn:
            store = ProjectionStore(group)
            summary = await rebuild_from_postgres(
                conn,
                QuotaSettler(client),
                store.t("requests"),
                store.t("quota_outbox"),
                now_ms=int(time.time() * 1000),
                lease_ms=quota_keys.DEFAULT_STREAM_LEASE_MS,
            )
    finally:
        await client.aclose()
    print(json.dumps({"rebuilt": summary}))
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        bootstrap=config.kafka_bootstrap(),
        database_url=config.database_url(),
        redis_url=config.redis_url(),
        topics=args.topics or [topics.prompts(), topics.tokens()],
        group=args.group,
        batch_max=args.batch_max,
        store_text=config.get_bool("STORE_TEXT"),
        dlq_topic=None if args.no_dlq else (topics.dlq() or None),
        instance_id=args.instance_id or None,
        session_timeout_ms=args.session_timeout_ms,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    metrics = runner.Listen(
        args.metrics_host,
        args.metrics_port,
        "aggregator metrics",
        "LLMSTREAM_AGGREGATOR_METRICS_PORT",
    )
    proc = runner.ServiceProcess(name="aggregator", metrics=None if args.rebuild_quota else metrics)

    async def run(shutdown: runner.Shutdown) -> int:
        if not args.no_migrate:
            await migrate.apply(config.database_url())
        if args.rebuild_quota:
            return await _rebuild_quota(args.group)
        return await serve(_settings(args), shutdown)

    return runner.run(proc, run)
