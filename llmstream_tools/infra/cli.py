"""`llmstream infra up|down|status|init`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import psycopg

from llmstream import config


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmstream infra",
        description="Local Kafka (KRaft), PostgreSQL and Redis for development and tests.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser(
        "up", help="start what is missing, create topics, apply migrations (idempotent)"
    )
    up.add_argument(
        "--brokers",
        type=int,
        help="Kafka nodes of a new local cluster (default 1; 3: replication factor 3, "
        "min.insync.replicas 2). A cluster keeps the size it was first started with.",
    )
    up.add_argument(
        "--with-prometheus",
        action="store_true",
        help="also a local Prometheus scraping `llmstream up`'s services with the alerting "
        "rules of deploy/prometheus/rules (docs/operations.md)",
    )
    sub.add_parser("down", help="stop what `infra up` started (data is kept)")
    sub.add_parser("status", help="each component with its address and state")
    init = sub.add_parser(
        "init",
        help="only create topics and apply migrations on servers that already run "
        "(the docker-compose and Kubernetes init jobs)",
    )
    init.add_argument(
        "--acls",
        action="store_true",
        help="also create the Kafka ACLs of every service principal (docs/security.md); the "
        "Kafka user (LLMSTREAM_KAFKA_USERNAME) must be allowed to",
    )
    args = parser.parse_args(list(argv))

    from llmstream import migrate
    from llmstream_tools import infra

    try:
        if args.action == "down":
            stopped = infra.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")
            return 0
        if args.action == "status":
            statuses = infra.status()
            for s in statuses + infra.optional_status():
                print(f"{s.name:<10} {s.address:<45} {s.state}")
            return 0 if all(s.state.startswith("running") for s in statuses) else 3
        if args.action == "up":
            optional = infra.OPTIONAL if args.with_prometheus else ()
            for s in infra.up((*infra.COMPONENTS, *optional), brokers=args.brokers):
                print(f"{s.name:<10} {s.address:<45} {s.state}")
        infra.ensure_topics()
        if getattr(args, "acls", False):
            print(f"kafka ACLs in place: {infra.apply_kafka_acls()}")
        applied = asyncio.run(migrate.apply(config.database_url()))
        print(f"topics ready; migrations applied: {', '.join(applied) or 'none pending'}")
        return 0
    except (infra.InfraError, config.ConfigError, migrate.MigrationError) as exc:
        print(f"llmstream infra {args.action}: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"llmstream infra {args.action}: PostgreSQL unreachable: {exc}", file=sys.stderr)
        return 1
