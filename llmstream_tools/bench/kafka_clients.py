"""Kafka client on the hot path: aiokafka vs confluent-kafka (librdkafka), side by side, and what
a token event carries, byte by byte (issue 21).

    llmstream bench kafka-clients [--kc-records 10000] [--kc-rates 200 2000] [--kc-seconds 1.5]
                                  [--kc-repeat 3]

Against the broker of `llmstream infra up`, on topics of its own (created, then deleted):

1. produce / fetch at backlog: `--kc-records` real token events (llmstream.codec: a 1-token
   delta and a coalesced 8-token delta, each with and without the trace context) keyed by 64
   request ids over 4 partitions, sent without waiting in between (like many streams' emitters),
   then read back by a reader assigned to those partitions (like the gateway's); produced again
   at linger 5 ms; and, for librdkafka, `produce()` alone without a future per record (its
   floor from Python). CPU per record of the whole process (every thread: librdkafka's are
   counted) and of the event loop's thread, records/s.
2. low rate: one stream of 1-token deltas with the trace context, paced at each `--kc-rates`
   for `--kc-seconds`, producer and reader in this process: produce -> fetch latency p50/p99 and
   CPU per record (both sides, idle polling included), at linger 0 ms (ours) and 5 ms (the
   Kafka 4 producer default, KIP-1030).
3. record size (computed, nothing sent): bytes per token of today's token event and after each
   proposed cut, cumulative.

The clients alternate (aiokafka first in repeats 1, 3, ..., confluent-kafka in 2, 4, ...), so
load from elsewhere on the shared machine hits both; every figure is the median of the repeats
and every ratio (confluent-kafka / aiokafka) the median of the per-repeat ratios.

What an asyncio service would pay for librdkafka is measured, not its C speed alone:
confluent-kafka has no event-loop integration that fits us (`confluent_kafka.aio.AIOProducer` refuses
record headers and holds records until 1,000 are buffered or 1 s passed;
`AIOConsumer.consume(n, timeout)` returns only when n records or the timeout arrived, one
thread-pool hop per call). So the adapters below do what a service would: `produce()` on the
loop thread (it only enqueues), delivery reports served by a thread blocked in `poll()` and
handed to the loop in one `call_soon_threadsafe` per poll; a fetch thread that blocks in
`poll()` for the first record, takes what else is ready with `consume(n, 0)` and hands the batch
over. Both sides touch what the gateway reads of a record (key, value, offset; not headers).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiokafka
from aiokafka import TopicPartition

from llmstream import config
from llmstream_tools.bench.kafka_adapters import (
    CLIENTS,
    BenchReader,
    Clock,
    ConfluentProducer,
    _confluent,
    new_producer,
    new_reader,
)
from llmstream_tools.bench.kafka_records import (
    CUTS,
    FETCH_MAX_WAIT_MS,
    FETCH_TIMEOUT_S,
    KINDS,
    LATENCY_KIND,
    PARTITIONS,
    REQUESTS,
    WARMUP,
    records,
    size_audit,
)
from llmstream_tools.stack import create_topics, delete_topics

# Per kind: the partitions' offsets before and after its records.
Ranges = dict[str, tuple[dict[TopicPartition, int], dict[TopicPartition, int]]]


# -- measurements -------------------------------------------------------------------------------


def _slug(kind: str) -> str:
    return kind.replace(" + ", "-").replace(" ", "")


async def produce_backlog(
    client: str, bootstrap: str, topics: dict[str, str], n: int, linger_ms: int
) -> tuple[dict[str, dict[str, float]], Ranges]:
    """Per kind: n records sent without waiting in between (many streams' emitters at once);
    the clock stops when every one is acknowledged. Also the offsets they got."""
    out: dict[str, dict[str, float]] = {}
    ranges: Ranges = {}
    producer = new_producer(client, bootstrap, linger_ms)
    await producer.start()
    try:
        for kind, topic in topics.items():
            recs = records(kind)
            warm = [
                await producer.send(topic, r.value, r.key, r.partition, r.headers) for r in recs
            ]
            await asyncio.gather(*warm)  # connection, metadata, producer id: off the clock
            clock = Clock()
            futs = []
            for i in range(n):
                r = recs[i % REQUESTS]
                futs.append(await producer.send(topic, r.value, r.key, r.partition, r.headers))
            done = await asyncio.gather(*futs)
            out[kind] = clock.per_record(f"produce_linger{linger_ms}", n)
            start: dict[TopicPartition, int] = {}
            end: dict[TopicPartition, int] = {}
            for d in done:
                tp = TopicPartition(topic, d.partition)
                start[tp] = min(start.get(tp, d.offset), d.offset)
                end[tp] = max(end.get(tp, d.offset + 1), d.offset + 1)
            ranges[kind] = (start, end)
    finally:
        await producer.stop()
    return out, ranges


async def produce_floor(bootstrap: str, topics: dict[str, str], n: int) -> dict[str, Any]:
    """Per kind: librdkafka's floor from Python (ConfluentProducer.floor), linger 0."""
    out: dict[str, dict[str, float]] = {}
    producer = ConfluentProducer(bootstrap, linger_ms=0)
    await producer.start()
    try:
        for kind, topic in topics.items():
            recs = records(kind)
            warm = [
                await producer.send(topic, r.value, r.key, r.partition, r.headers) for r in recs
            ]
            await asyncio.gather(*warm)
            out[kind] = await producer.floor(topic, recs, n)
    finally:
        await producer.stop()
    return out


async def read(reader: BenchReader, count: int, within_s: float = 30) -> int:
    """Fetch until at least `count` records came; how many did."""
    deadline = time.monotonic() + within_s
    got = 0
    while got < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{got} of {count} records fetched in {within_s} s")
        got += len(reader.touch(await reader.fetch()))
    return got


async def fetch_backlog(
    client: str, bootstrap: str, ranges: Ranges, n: int
) -> dict[str, dict[str, float]]:
    """Per kind: the n records of `ranges` read back by a reader assigned to their partitions."""
    out: dict[str, dict[str, float]] = {}
    reader = new_reader(client, bootstrap)
    await reader.start()
    try:
        for kind, (start, end) in ranges.items():
            # Off the clock: every partition fetched once (its last record, the topic's last:
            # nothing to prefetch), so the clock sees fetching, not metadata and connections;
            # then back to the start. librdkafka fetches from the new position only when the
            # long poll in flight ends (<= fetch max wait), aiokafka at once: records/s from the
            # first batch on (the delivery rate once records flow), the CPU from the seek.
            await reader.assign({tp: offset - 1 for tp, offset in end.items()})
            await read(reader, len(end))
            clock = Clock()  # before the seek: librdkafka's thread may start fetching first
            await reader.seek(start)
            first = await read(reader, 1)
            began = time.perf_counter()
            await read(reader, n - first)
            wall = time.perf_counter() - began
            out[kind] = clock.per_record("fetch", n)
            # Delivery rate once records flow (0: the first batch held them all).
            out[kind]["fetch_records_per_s"] = round((n - first) / wall) if n > first else 0
    finally:
        await reader.stop()
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def paced(
    client: str, bootstrap: str, topic: str, linger_ms: int, rates: Sequence[int], seconds: float
) -> dict[int, dict[str, float]]:
    """One stream at each rate: produce -> fetch latency and CPU per record (both sides)."""
    rec = records(LATENCY_KIND)[0]
    tp = TopicPartition(topic, 0)
    producer = new_producer(client, bootstrap, linger_ms)
    reader = new_reader(client, bootstrap)
    await producer.start()
    await reader.start()
    received: dict[int, float] = {}
    first = (await (await producer.send(topic, rec.value, rec.key, 0, rec.headers))).offset
    await reader.assign({tp: first})

    async def receive() -> None:
        while True:
            batch = await reader.fetch()
            now = time.perf_counter()
            for offset in reader.touch(batch):
                received[offset] = now

    async def until_received(last: int, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while last not in received:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{client}: offset {last} not fetched within {within_s} s")
            await asyncio.sleep(0.01)

    receiver = asyncio.create_task(receive())
    out: dict[int, dict[str, float]] = {}
    try:
        for _ in range(WARMUP):
            await producer.send(topic, rec.value, rec.key, 0, rec.headers)
        await until_received(first + WARMUP, 30)
        for rate in rates:
            count = max(1, round(rate * seconds))
            futs = []
            clock = Clock()
            began = time.perf_counter()
            for i in range(count):
                delay = began + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = time.perf_counter()
                fut = await producer.send(topic, rec.value, rec.key, 0, rec.headers)
                futs.append((now, fut))
            done = [(t, await f) for t, f in futs]
            await until_received(done[-1][1].offset, 30)
            cpu = clock.per_record("paced", count)
            lat = [(received[d.offset] - t) * 1000 for t, d in done]
            out[rate] = {
                "records": count,
                "latency_ms_p50": round(_quantile(lat, 0.5), 2),
                "latency_ms_p99": round(_quantile(lat, 0.99), 2),
                "cpu_us_per_record": cpu["paced_cpu_us_per_record"],
                "loop_cpu_us_per_record": cpu["paced_loop_cpu_us_per_record"],
            }
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        await producer.stop()
        await reader.stop()
    return out


# -- the suite ----------------------------------------------------------------------------------


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--kc-records", type=int, default=10_000, help="records per kind, client and repeat"
    )
    group.add_argument(
        "--kc-rates", type=int, nargs="+", default=[200, 2000], help="low-rate runs, records/s"
    )
    group.add_argument("--kc-seconds", type=float, default=1.5, help="length of a low-rate run")
    group.add_argument("--kc-repeat", type=int, default=3, help="alternations of the two clients")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _ratios(runs: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """confluent-kafka / aiokafka of one metric: the median of the per-repeat ratios."""
    ratios = [
        r["confluent-kafka"][metric] / r["aiokafka"][metric] for r in runs if r["aiokafka"][metric]
    ] or [0.0]  # a tiny run may have nothing to divide by (records/s 0)
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _row(what: str, runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, str]:
    """One fact: each client's medians of `metrics` (joined by ' / '), then the ratios
    confluent-kafka / aiokafka, with the spread of the first one over the repeats."""
    values = {
        c: " / ".join(_fmt(_median([r[c][m] for r in runs])) for m in metrics) for c in CLIENTS
    }
    ratios = [_ratios(runs, m) for m in metrics]
    ratio = " / ".join(f"{r['median']:.2f}" for r in ratios)
    return {
        "what": what,
        "value": f"aiokafka {values['aiokafka']} · confluent-kafka {values['confluent-kafka']} · "
        f"ratio {ratio} [{ratios[0]['min']:.2f}-{ratios[0]['max']:.2f}]",
    }


def _floor(where: str, runs: list[dict[str, Any]]) -> dict[str, str]:
    """confluent-kafka's floor (produce() alone) against aiokafka's produce as we use it."""
    ck = [r["confluent-kafka"] for r in runs]
    ratios = [
        c["produce_floor_cpu_us_per_record"] / r["aiokafka"]["produce_linger0_cpu_us_per_record"]
        for c, r in zip(ck, runs, strict=True)
    ]
    cpu = _median([c["produce_floor_cpu_us_per_record"] for c in ck])
    loop = _median([c["produce_floor_loop_cpu_us_per_record"] for c in ck])
    return {
        "what": f"produce floor (confluent-kafka: produce() alone, no future per record): "
        f"CPU µs/record, process / event loop; {where}",
        "value": f"confluent-kafka {_fmt(cpu)} / {_fmt(loop)} · ratio to aiokafka's produce "
        f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]",
    }


def summarize(result: dict[str, Any]) -> list[dict[str, str]]:
    facts: list[dict[str, str]] = []
    sizes = {row["cut"]: row["kinds"] for row in result["record_size"]["steps"]}
    today = sizes[CUTS[0].name]
    for kind, runs in result["backlog"].items():
        where = f"{kind} ({today[kind]['record']} B), backlog"
        for phase, label in (
            ("produce_linger0", "produce, linger 0"),
            ("fetch", "fetch"),
            ("produce_linger5", "produce, linger 5 ms"),
        ):
            facts.append(
                _row(
                    f"{label}: CPU µs/record, process / event loop; {where}",
                    runs,
                    [f"{phase}_cpu_us_per_record", f"{phase}_loop_cpu_us_per_record"],
                )
            )
            rate = "records/s (first to last record)" if phase == "fetch" else "records/s"
            facts.append(_row(f"{label}: {rate}; {where}", runs, [f"{phase}_records_per_s"]))
            if phase == "produce_linger0":
                facts.append(_floor(where, runs))
    for linger, by_rate in result["low_rate"].items():
        for rate, runs in by_rate.items():
            where = f"{rate}/s, linger {linger} ms, {LATENCY_KIND}"
            facts.append(
                _row(
                    f"produce→fetch ms p50 / p99; {where}",
                    runs,
                    ["latency_ms_p50", "latency_ms_p99"],
                )
            )
            facts.append(
                _row(
                    f"CPU µs/record, producer + reader, idle included, process / event loop; "
                    f"{where}",
                    runs,
                    ["cpu_us_per_record", "loop_cpu_us_per_record"],
                )
            )
    for cut, kinds in sizes.items():
        parts = [
            f"{kind} {v['bytes_per_token']:g} ({v['bytes_per_token_alone_in_batch']:g})"
            for kind, v in kinds.items()
        ]
        facts.append({"what": f"bytes/token, {cut}", "value": " · ".join(parts)})
    parts = [f"{k} {v}" for k, v in result["record_size"]["breakdown_1_token_trace"].items()]
    facts.append({"what": "bytes of today's 1-token + trace record", "value": " · ".join(parts)})
    facts.append(
        {
            "what": "token ids already packed (proto3 default: no cut to make there)",
            "value": "yes" if result["record_size"]["token_ids_packed"] else "NO",
        }
    )
    versions = result["versions"]
    facts.append(
        {
            "what": "clients; load average at start / end of the suite",
            "value": f"aiokafka {versions['aiokafka']}, confluent-kafka "
            f"{versions['confluent-kafka']} (librdkafka {versions['librdkafka']}); "
            f"{result['load_average']['start']} / {result['load_average']['end']}",
        }
    )
    return facts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ck = _confluent()
    bootstrap = config.kafka_bootstrap()
    result: dict[str, Any] = {
        "versions": {
            "aiokafka": aiokafka.__version__,
            "confluent-kafka": importlib.metadata.version("confluent-kafka"),
            "librdkafka": ck.libversion()[0],
        },
        "settings": {
            "records": args.kc_records,
            "rates": args.kc_rates,
            "seconds": args.kc_seconds,
            "repeat": args.kc_repeat,
            "partitions": PARTITIONS,
            "producer": "idempotent, acks=all, linger 0 ms (backlog) / 0 and 5 ms (low rate)",
            "reader": f"fetch max wait {FETCH_MAX_WAIT_MS} ms, fetch timeout {FETCH_TIMEOUT_S} s",
        },
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
        "record_size": size_audit(),
    }
    run_id = uuid.uuid4().hex[:8]
    backlog_topics = {
        c: {kind: f"llmstream-bench-kc-{run_id}-{c}-{_slug(kind)}" for kind in KINDS}
        for c in CLIENTS
    }
    paced_topics = {c: f"llmstream-bench-kc-{run_id}-{c}-paced" for c in CLIENTS}
    every = [t for c in CLIENTS for t in backlog_topics[c].values()]
    await create_topics(
        bootstrap, {**dict.fromkeys(every, PARTITIONS), **dict.fromkeys(paced_topics.values(), 1)}
    )
    backlog_runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    low_rate: dict[int, dict[int, list[dict[str, Any]]]] = {
        linger: {rate: [] for rate in args.kc_rates} for linger in (0, 5)
    }
    try:
        for repeat in range(args.kc_repeat):
            order = CLIENTS if repeat % 2 == 0 else CLIENTS[::-1]
            per_client: dict[str, dict[str, dict[str, float]]] = {}
            for client in order:
                topics, n = backlog_topics[client], args.kc_records
                produced, ranges = await produce_backlog(client, bootstrap, topics, n, 0)
                # Before anything else is produced: the reader's ranges end at the topic's end,
                # so nothing past them is prefetched on the clock.
                fetched = await fetch_backlog(client, bootstrap, ranges, n)
                lingered, _ = await produce_backlog(client, bootstrap, topics, n, 5)
                floor = (
                    await produce_floor(bootstrap, topics, n) if client == "confluent-kafka" else {}
                )
                per_client[client] = {
                    kind: produced[kind] | fetched[kind] | lingered[kind] | floor.get(kind, {})
                    for kind in KINDS
                }
            for kind in KINDS:
                backlog_runs[kind].append({c: per_client[c][kind] for c in CLIENTS})
            for linger in (0, 5):
                paced_runs = {}
                for client in order:
                    paced_runs[client] = await paced(
                        client, bootstrap, paced_topics[client], linger, args.kc_rates,
                        args.kc_seconds,
                    )  # fmt: skip
                for rate in args.kc_rates:
                    low_rate[linger][rate].append({c: paced_runs[c][rate] for c in CLIENTS})
            print(f"kafka-clients: repeat {repeat + 1}/{args.kc_repeat} done", file=sys.stderr)
    finally:
        await delete_topics(bootstrap, [*every, *paced_topics.values()])
    result["backlog"] = backlog_runs
    result["low_rate"] = low_rate
    result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    result["facts"] = summarize(result)
    return result
