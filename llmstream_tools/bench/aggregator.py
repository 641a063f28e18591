"""Aggregator and replay benchmark (real Kafka + PostgreSQL + Redis from `llmstream infra up`).

    llmstream bench aggregator [--agg-events 200000] [--agg-rate 20000] [--agg-seconds 15]

Measures, on fresh topics and a fresh database:
1. fold: decode + fold of synthetic events in memory (events/s, one core);
2. replay: the same events read back from Kafka and folded (`llmstream replay` path);
3. projection catch-up: the aggregator (a `llmstream aggregator` process) projecting the whole
   backlog into PostgreSQL (events/s, batches of LLMSTREAM_AGGREGATOR_BATCH_MAX);
4. projection lag under load: token events produced at --rate/s for --seconds while the
   aggregator runs; lag sampled from its /metrics (events, seconds) and from PostgreSQL offsets;
5. rollup table vs view: monthly and daily usage queries over --ledger-rows ledger rows, and
   the cost of maintaining the table per batch.
Issue #21's goals (PASS/MISS): replay >= 300,000 events/s, projection >= 50,000 events/s.
Results: bench/results/<stamp>-aggregator.json (written by `llmstream bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg

from aggregator import replay
from llmstream import codec, config, kafka
from llmstream.fold import fold
from llmstream_tools.bench.loadgen import check
from llmstream_tools.testing import synthetic_events as synthetic
from llmstream_tools.testing.aggregator import (
    end_offsets,
    fresh_database,
    fresh_topics,
    new_producer,
    produce,
    stored_offsets,
    wait_caught_up,
)


def bench_fold(items: list[synthetic.Produced]) -> dict[str, Any]:
    values = [codec.encode(i.event) for i in items]
    start = time.perf_counter()
    states: dict[str, Any] = {}
    for v in values:
        e = codec.decode(v)
        states[e.request_id] = fold(states.get(e.request_id), e)
    elapsed = time.perf_counter() - start
    return {
        "events": len(values),
        "seconds": round(elapsed, 3),
        "events_per_s": round(len(values) / elapsed),
    }


async def bench_replay(bootstrap: str, topics: list[str], expected: int) -> dict[str, Any]:
    consumer = replay.new_consumer(bootstrap)
    await consumer.start()
    try:
        tps = await replay.partitions(consumer, topics)
        ranges = await replay.resolve(consumer, tps, replay.Start(), follow=False)
        folded = replay.Folded()
        start = time.perf_counter()
        async for records in kafka.read_range(consumer, ranges):
            replay.fold_records(records, folded)
        elapsed = time.perf_counter() - start
    finally:
        await consumer.stop()
    assert folded.records == expected, (folded.records, expected)
    return {
        "events": folded.records,
        "requests": len(folded.states),
        "seconds": round(elapsed, 3),
        "events_per_s": round(folded.records / elapsed),
    }


async def catch_up_rate(bootstrap: str, db: str, group: str, topics: list[str]) -> int:
    """Wait until caught up; the projection rate between 10% and 90% of the backlog."""
    ends = await end_offsets(bootstrap, topics)
    total = sum(ends.values())
    points: list[tuple[float, int]] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        stored = await stored_offsets(db, group)
        done = sum(min(stored.get(k, 0), v) for k, v in ends.items())
        points.append((time.monotonic(), done))
        if done >= total:
            break
        await asyncio.sleep(0.1)
    else:
        raise TimeoutError("projection did not catch up")
    lo = next(p for p in points if p[1] >= 0.1 * total)
    hi = next(p for p in points if p[1] >= 0.9 * total)
    return round((hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9))


def start_aggregator(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "llmstream_tools.cli", "aggregator", "--no-migrate"],
            env=env,
            stdout=out,
            stderr=out,
            cwd=Path(__file__).resolve().parents[1],
        )


def scrape(port: int) -> dict[str, float]:
    """Sum of each aggregator gauge/counter family in /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llmstream_aggregator_lag_"):
            name, value = line.rsplit(" ", 1)
            family = name.split("{", 1)[0]
            if family.endswith("seconds"):
                out[family] = max(out.get(family, 0.0), float(value))
            else:
                out[family] = out.get(family, 0.0) + float(value)
    return out


async def lag_under_load(
    bootstrap: str,
    topics: Any,
    db: str,
    group: str,
    token_rate: int,
    tokens_per_event: int,
    seconds: float,
    port: int,
) -> dict[str, Any]:
    """Produce `token_rate` tokens/s for `seconds` while the aggregator runs, each token_delta
    event carrying `tokens_per_event` tokens (workers coalesce model deltas)."""
    run = uuid.uuid4().hex[:6]
    rate = max(1, token_rate // tokens_per_event)  # events/s
    n_requests = max(1, int(rate * seconds / 200))
    plans = [
        synthetic.RequestPlan(f"lag-{run}-{i}", "bench-lag", "m", 200, 10, 300, "stop")
        for i in range(n_requests)
    ]
    items = list(synthetic.interleaved(plans, topics.prompts, topics.tokens, width=64))
    for item in items:
        d = item.event.token_delta
        if item.event.HasField("token_delta") and tokens_per_event > 1:
            d.token_ids.extend(range(1, tokens_per_event))
            d.text = d.text * tokens_per_event
    producer = await new_producer(bootstrap, linger_ms=2)
    samples_events: list[float] = []
    samples_seconds: list[float] = []
    sent = 0
    start = time.monotonic()
    try:
        chunk = max(1, rate // 20)  # 20 sends per second
        next_at = start
        while sent < len(items) and time.monotonic() - start < seconds:
            await produce(producer, items[sent : sent + chunk], window=chunk)
            sent += min(chunk, len(items) - sent)
            next_at += chunk / rate
            # Sampled halfway between two bursts (a burst every 50 ms).
            await asyncio.sleep(max(0.0, next_at - 0.025 - time.monotonic()))
            try:
                m = scrape(port)
                samples_events.append(m.get("llmstream_aggregator_lag_events", 0.0))
                samples_seconds.append(m.get("llmstream_aggregator_lag_seconds", 0.0))
            except OSError:
                pass
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        produced_s = time.monotonic() - start
        drain = await wait_caught_up(bootstrap, db, group, topics.both, timeout_s=120)
    finally:
        await producer.stop()

    def pct(xs: list[float], q: float) -> float:
        return round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else 0.0

    return {
        "target_tokens_per_s": token_rate,
        "tokens_per_event": tokens_per_event,
        "target_events_per_s": rate,
        "achieved_events_per_s": round(sent / produced_s),
        "events": sent,
        "seconds": round(produced_s, 2),
        "lag_events_p50": pct(samples_events, 0.5),
        "lag_events_p99": pct(samples_events, 0.99),
        "lag_events_max": max(samples_events, default=0.0),
        "lag_seconds_p50": pct(samples_seconds, 0.5),
        "lag_seconds_p99": pct(samples_seconds, 0.99),
        "lag_seconds_max": max(samples_seconds, default=0.0),
        "drain_after_stop_s": round(drain, 2),
        "samples": len(samples_events),
    }


async def bench_rollup(db: str, rows: int) -> dict[str, Any]:
    """Table (maintained per batch) vs view (GROUP BY over the ledger) for the same questions."""
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute("SET statement_timeout = 0")
        t0 = time.perf_counter()
        # 100 tenants x 4 models over 60 days, like a busy month of the ledger.
        await conn.execute(
            "INSERT INTO usage_ledger (request_id, tenant_id, model, status, finish_reason,"
            " prompt_tokens, completion_tokens, cost, billed_at, submitted_at, reserved_tokens)"
            " SELECT 'b-' || i, 'tenant-' || (i %% 100), 'model-' || (i %% 4), 'completed', 'stop',"
            " 20 + i %% 50, i %% 300, (i %% 300) * 0.000002, ts, ts, 400"
            " FROM (SELECT i, timestamptz '2026-01-01' + (i %% (60 * 86400)) * interval '1 second'"
            " AS ts FROM generate_series(1, %s) AS i) AS g",
            (rows,),
        )
        await conn.execute(
            "INSERT INTO usage_daily SELECT (billed_at AT TIME ZONE 'UTC')::date, tenant_id,"
            " model, count(*), count(*), 0, 0, sum(prompt_tokens), sum(completion_tokens),"
            " sum(cost), 0 FROM usage_ledger GROUP BY 1, 2, 3"
        )
        await conn.execute("ANALYZE usage_ledger")
        await conn.execute("ANALYZE usage_daily")
        load_s = time.perf_counter() - t0
        await conn.execute(
            "CREATE TEMP VIEW usage_daily_view AS SELECT (billed_at AT TIME ZONE 'UTC')::date AS"
            " day, tenant_id, model, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,"
            " sum(completion_tokens) AS completion_tokens, sum(cost) AS cost"
            " FROM usage_ledger GROUP BY 1, 2, 3"
        )
        invoice = (
            "SELECT model, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost)"
            " FROM {src} WHERE tenant_id = 'tenant-7' AND day >= '2026-01-01'"
            " AND day < '2026-02-01' GROUP BY model"
        )
        daily_all = (
            "SELECT tenant_id, sum(prompt_tokens + completion_tokens) FROM {src}"
            " WHERE day = '2026-01-15' GROUP BY tenant_id"
        )
        invoice_ledger = (
            "SELECT model, count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost)"
            " FROM usage_ledger WHERE tenant_id = 'tenant-7' AND billed_at >= '2026-01-01'"
            " AND billed_at < '2026-02-01' GROUP BY model"
        )

        async def timed(query: str, n: int = 5) -> float:
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await (await conn.execute(query.encode())).fetchall()
                times.append(time.perf_counter() - t)
            return round(statistics.median(times) * 1000, 2)

        out = {
            "ledger_rows": rows,
            "load_s": round(load_s, 1),
            "monthly_invoice_one_tenant_ms": {
                "table": await timed(invoice.format(src="usage_daily")),
                "view": await timed(invoice.format(src="usage_daily_view"), 3),
                "ledger_indexed": await timed(invoice_ledger, 3),
            },
            "one_day_all_tenants_ms": {
                "table": await timed(daily_all.format(src="usage_daily")),
                "view": await timed(daily_all.format(src="usage_daily_view"), 3),
            },
        }
        # Maintenance cost of the table: one upsert statement per batch (what the aggregator
        # runs), 2,000 bills spread over 20 (tenant, model) keys of one day.
        from decimal import Decimal

        from aggregator.projection import Bill, LedgerRow
        from aggregator.store import ProjectionStore

        store = ProjectionStore("bench")
        bills = [
            LedgerRow(
                Bill(
                    f"x{i}",
                    f"tenant-{i % 10}",
                    f"model-{i % 2}",
                    "completed",
                    "stop",
                    30,
                    200,
                    1_767_225_600_000,
                    1_767_225_600_000,
                    400,
                    None,
                ),
                Decimal("0.0004"),
                "USD",
                None,
            )
            for i in range(2000)
        ]
        times = []
        async with conn.transaction():  # the statement alone (the batch commits anyway)
            for _ in range(20):
                t = time.perf_counter()
                await store._write_rollup(conn, bills)
                times.append(time.perf_counter() - t)
        out["table_maintenance_ms_per_batch_of_2000_bills"] = round(
            statistics.median(times) * 1000, 2
        )
        return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    bootstrap = config.kafka_bootstrap()
    server_db = config.database_url()
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # The machine is shared: other work running at the same time shows here.
            "load_avg_1m_at_start": os.getloadavg()[0],
        },
        "batch_max": args.batch_max,
    }
    n_requests = max(1, args.events // 19)
    plans = synthetic.plan(
        n_requests, [f"bench-{i}" for i in range(10)], ["m"], seed=1, max_tokens=32
    )
    async with fresh_topics(bootstrap, partitions=3) as topics, fresh_database(server_db) as db:
        items = list(synthetic.interleaved(plans, topics.prompts, topics.tokens, width=100))
        results["fold"] = bench_fold(items)
        print("fold", results["fold"], file=sys.stderr, flush=True)
        producer = await new_producer(bootstrap, linger_ms=20)
        t = time.perf_counter()
        try:
            await produce(producer, items)
        finally:
            await producer.stop()
        results["produce_events_per_s"] = round(len(items) / (time.perf_counter() - t))
        results["replay"] = await bench_replay(bootstrap, topics.both, len(items))
        print("replay", results["replay"], file=sys.stderr, flush=True)

        group = f"bench-{uuid.uuid4().hex[:6]}"
        port = args.metrics_port
        env = {
            **os.environ,
            "LLMSTREAM_DATABASE_URL": db,
            "LLMSTREAM_REDIS_URL": config.redis_url(),
            "LLMSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "LLMSTREAM_TOPIC_PROMPTS": topics.prompts,
            "LLMSTREAM_TOPIC_TOKENS": topics.tokens,
            "LLMSTREAM_TOPIC_DLQ": topics.dlq,
            "LLMSTREAM_AGGREGATOR_GROUP": group,
            "LLMSTREAM_AGGREGATOR_BATCH_MAX": str(args.batch_max),
            "LLMSTREAM_AGGREGATOR_METRICS_PORT": str(port),
            "LLMSTREAM_AGGREGATOR_INSTANCE_ID": "bench-0",
            "LLMSTREAM_LOG_LEVEL": "WARNING",
        }
        log = Path(tempfile.gettempdir()) / f"llmstream-bench-aggregator-{group}.log"
        t = time.perf_counter()
        proc = start_aggregator(env, log)
        try:
            steady = await catch_up_rate(bootstrap, db, group, topics.both)
            total = time.perf_counter() - t
            results["projection_catch_up"] = {
                "events": len(items),
                "requests": len(plans),
                "seconds_incl_startup": round(total, 2),
                "events_per_s_incl_startup": round(len(items) / total),
                "events_per_s_steady": steady,
            }
            print("projection", results["projection_catch_up"], file=sys.stderr, flush=True)
            results["lag_under_load"] = []
            for tpe in args.tokens_per_event:
                lag = await lag_under_load(
                    bootstrap, topics, db, group, args.rate, tpe, args.seconds, port
                )
                results["lag_under_load"].append(lag)
                print("lag", lag, file=sys.stderr, flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        async with await psycopg.AsyncConnection.connect(db) as conn:
            cur = await conn.execute("SELECT count(*) FROM usage_ledger")
            row = await cur.fetchone()
            results["ledger_rows_after_projection"] = row[0] if row else None
        ends = await end_offsets(bootstrap, topics.both)
        stored = await stored_offsets(db, group)
        results["caught_up"] = all(stored.get(k, 0) >= v for k, v in ends.items() if v)
        if args.ledger_rows:
            async with fresh_database(server_db) as db2:
                results["rollup"] = await bench_rollup(db2, args.ledger_rows)
                print("rollup", results["rollup"], file=sys.stderr, flush=True)
    return results


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--agg-events", type=int, default=200_000, help="events of the replay/catch-up runs"
    )
    group.add_argument("--agg-rate", type=int, default=20_000, help="tokens/s of the lag runs")
    group.add_argument(
        "--agg-tokens-per-event",
        type=int,
        nargs="+",
        default=[4, 1],
        help="tokens per token_delta event, one lag run each (workers coalesce deltas)",
    )
    group.add_argument("--agg-seconds", type=float, default=15.0, help="duration of a lag run")
    group.add_argument("--agg-batch-max", type=int, default=2000)
    group.add_argument(
        "--agg-ledger-rows", type=int, default=1_000_000, help="0 skips the rollup run"
    )
    group.add_argument("--agg-metrics-port", type=int, default=19102)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ns = argparse.Namespace(
        events=args.agg_events,
        rate=args.agg_rate,
        tokens_per_event=args.agg_tokens_per_event,
        seconds=args.agg_seconds,
        batch_max=args.agg_batch_max,
        ledger_rows=args.agg_ledger_rows,
        metrics_port=args.agg_metrics_port,
    )
    results = await main_async(ns)
    results["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    replayed, catch_up = results["replay"], results["projection_catch_up"]
    results["facts"] = [  # for the summary of `llmstream bench`
        {
            "what": "replay: token events read back from Kafka and folded",
            "value": f"{replayed['events_per_s']:,.0f} events/s",
        },
        {
            "what": "projection into PostgreSQL (one aggregator, catch-up)",
            "value": f"{catch_up['events_per_s_steady']:,.0f} events/s",
        },
        {
            "what": "fold alone: decode + fold in memory, one core",
            "value": f"{results['fold']['events_per_s']:,.0f} events/s",
        },
    ]
    results["facts"] += [_lag_fact(lag) for lag in results["lag_under_load"]]
    if "rollup" in results:
        results["facts"] += _rollup_facts(results["rollup"])
    results["goals"] = goals(replayed["events_per_s"], catch_up["events_per_s_steady"])
    return results


def _lag_fact(lag: dict[str, Any]) -> dict[str, str]:
    return {
        "what": f"projection lag, {lag['target_tokens_per_s']:,} tokens/s offered, "
        f"{lag['tokens_per_event']} token(s) per event",
        "value": f"producer reached {lag['achieved_events_per_s']:,} events/s; lag p50 "
        f"{lag['lag_events_p50']:,.0f} events, {lag['lag_seconds_p50']} s / p99 "
        f"{lag['lag_events_p99']:,.0f} events, {lag['lag_seconds_p99']} s; drained "
        f"{lag['drain_after_stop_s']} s after the producer stopped",
    }


def _rollup_facts(r: dict[str, Any]) -> list[dict[str, str]]:
    invoice, day = r["monthly_invoice_one_tenant_ms"], r["one_day_all_tenants_ms"]
    rows = f"{r['ledger_rows']:,} ledger rows"
    return [
        {
            "what": f"one tenant's month per model (the invoice), {rows}",
            "value": f"table usage_daily {invoice['table']} ms · view (GROUP BY over the "
            f"ledger) {invoice['view']} ms · ledger, indexed {invoice['ledger_indexed']} ms",
        },
        {
            "what": f"one day, all tenants (dashboard), {rows}",
            "value": f"table usage_daily {day['table']} ms · view {day['view']} ms",
        },
        {
            "what": "usage_daily maintenance per batch of 2,000 bills (one upsert statement)",
            "value": f"{r['table_maintenance_ms_per_batch_of_2000_bills']} ms",
        },
    ]


REPLAY_GOAL_EVENTS_PER_S = 300_000
PROJECTION_GOAL_EVENTS_PER_S = 50_000


def goals(replay_rate: float, projection_rate: float) -> list[dict[str, str]]:
    """Issue #21's goals on replay and projection."""
    return [
        check(
            f"replay (read from Kafka + fold) >= {REPLAY_GOAL_EVENTS_PER_S:,} events/s",
            replay_rate >= REPLAY_GOAL_EVENTS_PER_S,
            f"{replay_rate:,.0f} events/s",
        ),
        check(
            f"projection into PostgreSQL >= {PROJECTION_GOAL_EVENTS_PER_S:,} events/s per "
            "aggregator",
            projection_rate >= PROJECTION_GOAL_EVENTS_PER_S,
            f"{projection_rate:,.0f} events/s",
        ),
    ]
