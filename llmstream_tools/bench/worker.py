"""Worker overhead benchmark: CPU the worker spends per delivered token, with and without
coalescing, at several numbers of concurrent synthetic streams.

    llmstream bench worker --worker-streams 1 64 512 --worker-tokens 100 --worker-itl-ms 10

Each case uses fresh topics and a fresh worker process against one synthetic model server,
submits `streams` requests at once and waits for every terminal event. The worker's CPU time
(user + system, from /proc) over the case divided by the tokens delivered is its overhead per
token (Kafka produce + gRPC receive + event encoding); events/token shows the coalescing.
Needs the Kafka broker of `llmstream infra up`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from llmstream import config
from llmstream.ports import free_port
from llmstream_tools.testing.worker import (
    collect,
    create_topics,
    delete_topics,
    produce,
    start_model_server,
    start_worker,
    submit_event,
    wait_model_server,
)

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def run_case(
    tmp: Path, addr: str, streams: int, tokens: int, coalesce_ms: float
) -> dict[str, float]:
    topics = await create_topics(config.kafka_bootstrap())
    env = topics.env(
        [addr],
        LLMSTREAM_WORKER_COALESCE_MS=str(coalesce_ms),
        LLMSTREAM_WORKER_MAX_INFLIGHT=str(max(streams, 1)),
        LLMSTREAM_LOG_LEVEL="WARNING",
    )
    worker = start_worker(tmp, env, f"bench-{uuid.uuid4().hex[:6]}")
    try:
        warm = f"warm-{uuid.uuid4().hex[:8]}"
        await produce(
            topics.bootstrap, topics.prompts, [submit_event(warm, "warm", 5, topics.tokens, 0)]
        )
        await collect(topics.bootstrap, topics.tokens, [warm], within_s=30)
        ids = [f"b-{uuid.uuid4().hex[:12]}" for _ in range(streams)]
        events = [
            submit_event(r, f"bench prompt {i}", tokens, topics.tokens, i % topics.partitions)
            for i, r in enumerate(ids)
        ]
        # Idle cost (heartbeats, fetch and commit loops), subtracted for the net figure.
        idle0 = cpu_seconds(worker.popen.pid)
        await asyncio.sleep(2.0)
        idle_rate = (cpu_seconds(worker.popen.pid) - idle0) / 2.0
        cpu0 = cpu_seconds(worker.popen.pid)
        t0 = time.monotonic()
        await produce(topics.bootstrap, topics.prompts, events)
        got = await collect(topics.bootstrap, topics.tokens, ids, within_s=120)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(worker.popen.pid) - cpu0
        delivered = 0
        deltas = 0
        for r in ids:
            st = got.check_contract(r)
            delivered += len(st.token_ids)
            deltas += st.last_seq
        return {
            "streams": streams,
            "coalesce_ms": coalesce_ms,
            "tokens": delivered,
            "token_events": deltas,
            "tokens_per_event": round(delivered / max(deltas, 1), 2),
            "wall_s": round(wall, 2),
            "tokens_per_s": round(delivered / wall),
            "worker_cpu_s": round(cpu, 2),
            "worker_cpu_us_per_token": round(cpu / max(delivered, 1) * 1e6, 1),
            "worker_idle_cpu_pct": round(idle_rate * 100, 1),
            "net_cpu_us_per_token": round(
                max(0.0, cpu - idle_rate * wall) / max(delivered, 1) * 1e6, 1
            ),
        }
    finally:
        worker.kill()
        await delete_topics(topics)


async def main_async(args: argparse.Namespace) -> list[dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    port = free_port()
    server = start_model_server(tmp, port, itl_ms=args.itl_ms, ttft_ms=5)
    addr = f"127.0.0.1:{port}"
    results = []
    try:
        await wait_model_server(addr)
        for streams in args.streams:
            for coalesce_ms in args.coalesce_ms:
                res = await run_case(tmp, addr, streams, args.tokens, coalesce_ms)
                res["itl_ms"] = args.itl_ms
                print(res, file=sys.stderr, flush=True)
                results.append(res)
    finally:
        server.kill()
    return results


def add_arguments(group: Any) -> None:
    group.add_argument("--worker-streams", type=int, nargs="+", default=[1, 64, 512])
    group.add_argument("--worker-tokens", type=int, default=100, help="tokens per stream")
    group.add_argument(
        "--worker-itl-ms", type=float, default=10.0, help="synthetic time between tokens"
    )
    group.add_argument(
        "--worker-coalesce-ms",
        type=float,
        nargs="+",
        default=[0.0, float("inf")],
        help="coalescing windows to compare (0: never merge; inf, the default of "
        "LLMSTREAM_WORKER_COALESCE_MS: natural batching, no timer)",
    )


def _json_ms(ms: float) -> float | str:
    """JSON has no infinity."""
    return "inf" if ms == float("inf") else ms


def _coalescing(ms: float) -> str:
    if ms == float("inf"):
        return "natural batching (no timer)"
    return "never merged" if ms == 0 else f"coalescing window {ms:g} ms"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ns = argparse.Namespace(
        streams=args.worker_streams,
        tokens=args.worker_tokens,
        itl_ms=args.worker_itl_ms,
        coalesce_ms=args.worker_coalesce_ms,
    )
    results = await main_async(ns)
    print(
        "\n| streams | coalesce ms | tokens | events | tokens/event | tokens/s "
        "| worker CPU µs/token | net of idle |",
        file=sys.stderr,
    )
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in results:
        print(
            f"| {r['streams']} | {r['coalesce_ms']:g} | {r['tokens']} | {r['token_events']} | "
            f"{r['tokens_per_event']} | {r['tokens_per_s']} | {r['worker_cpu_us_per_token']} | "
            f"{r['net_cpu_us_per_token']} |",
            file=sys.stderr,
        )
    facts = [
        {
            "what": f"worker CPU per token, {r['streams']} streams at {r['itl_ms']:g} ms/token, "
            + _coalescing(r["coalesce_ms"]),
            "value": f"{r['worker_cpu_us_per_token']} µs ({r['tokens_per_event']} tokens/event)",
        }
        for r in results
    ]
    cases = [{**r, "coalesce_ms": _json_ms(r["coalesce_ms"])} for r in results]
    return {"cases": cases, "facts": facts}
