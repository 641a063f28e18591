"""Gateway benchmark (`llmstream bench gateway`): memory per idle WebSocket, how many sockets
one gateway process holds, and the latency the gateway path adds (socket in -> prompts topic ->
worker -> tokens topic -> socket out).

Each socket count (`--gateway-sockets`, default 1,000 and 10,000) gets a fresh gateway process
(`llmstream gateway`, fresh topics and a fresh database, its socket cap
LLMSTREAM_GATEWAY_MAX_SOCKETS set to the count) `--gateway-repeat` times: N authenticated
sockets are opened (hello read), the gateway's RSS is read before and after, the sockets are
held `--gateway-hold-s` seconds and must all still be open at the end. Both ends of every
socket live on this machine (the load generator holds N, the gateway N), so the soft limit on
open files of this process, which the gateway inherits, is raised first with
`resource.setrlimit` to 2 N + 1,024 or the hard limit if that is lower (recorded in the results).
Then, on one socket, requests one at a time answered at once by an in-process echo worker
(1 token + completed): submit -> first token and submit -> done percentiles. Nothing is
asserted; issue #21's goals print PASS/MISS: idle socket <= 20 KiB at every count, 10,000
sockets held by one gateway process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg

from llmstream import config
from llmstream.ports import free_port
from llmstream_tools import admin
from llmstream_tools.bench import loadgen
from llmstream_tools.bench.targets import GatewayTarget
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.aggregator import fresh_database

IDLE_SOCKET_GOAL_KIB = 20
HELD_SOCKETS_GOAL = 10_000


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--gateway-sockets", type=int, nargs="+", default=[1000, 10_000], help="idle socket counts"
    )
    group.add_argument("--gateway-repeat", type=int, default=3, help="fresh gateways per count")
    group.add_argument("--gateway-hold-s", type=float, default=5.0, help="how long to hold them")
    group.add_argument("--gateway-requests", type=int, default=300, help="sequential requests")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _wait_healthy(port: int, proc: asyncio.subprocess.Process) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.returncode is not None:
            raise RuntimeError("gateway exited during start")
        try:
            await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{port}/readyz", timeout=1
            )
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise TimeoutError("gateway not ready")


def _pct(values: list[float], p: float) -> float:
    return round(loadgen.quantile(sorted(values), p), 2)


def raise_open_files(wanted: int) -> int:
    """Raise the soft limit on open files towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@contextlib.asynccontextmanager
async def gateway_process(
    t: testing.Topics, database_url: str, max_sockets: int | None = None
) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    port = free_port()
    env = {
        **os.environ,
        "LLMSTREAM_TOPIC_PROMPTS": t.prompts,
        "LLMSTREAM_TOPIC_TOKENS": t.tokens,
        "LLMSTREAM_TOPIC_MODELS": t.models,
        "LLMSTREAM_DATABASE_URL": database_url,
        "LLMSTREAM_LOG_LEVEL": "WARNING",
    }
    if max_sockets is not None:
        env["LLMSTREAM_GATEWAY_MAX_SOCKETS"] = str(max_sockets)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmstream_tools.cli", "gateway", "--port", str(port),
        "--partitions", f"0-{t.partitions - 1}",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_healthy(port, proc)
        yield port, proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def idle_sockets(
    t: testing.Topics, database_url: str, key: str, n: int, hold_s: float
) -> dict[str, Any]:
    """A fresh gateway, `n` idle sockets: RSS per socket and whether all are held."""
    async with gateway_process(t, database_url, max_sockets=n) as (port, proc):
        target = GatewayTarget(port, key, connect_concurrency=32)
        rss_before = _rss_kib(proc.pid)
        t0 = time.perf_counter()
        error = ""
        try:
            try:
                await target.open(n)
            except ConnectionError as exc:  # count what was held
                error = str(exc)
            open_s = time.perf_counter() - t0
            opened = len(target.sockets)
            await asyncio.sleep(1)
            rss_after = _rss_kib(proc.pid)
            await asyncio.sleep(max(0.0, hold_s - 1))
            held = sum(1 for s in target.sockets if s.ws.close_code is None)
            alive = proc.returncode is None
        finally:
            await target.close()
    return {
        "sockets": n,
        "held": held,
        "gateway_alive": alive,
        "open_s": round(open_s, 2),
        "gateway_rss_kib_before": rss_before,
        "gateway_rss_kib_after": rss_after,
        "opened": opened,
        "idle_socket_kib": round((rss_after - rss_before) / max(1, opened), 1),
        "error": error,
    }


async def latency(t: testing.Topics, database_url: str, key: str, n: int) -> dict[str, Any]:
    async with gateway_process(t, database_url) as (port, _):
        c = await testing.Client.connect(port, key)
        ttft: list[float] = []
        total: list[float] = []
        try:
            async with testing.FakeWorker(t):
                for i in range(n):
                    ref = f"b{i}"
                    t0 = time.perf_counter()
                    await c.submit(ref, max_tokens=1)
                    rid = (await c.wait_ref(ref))["request_id"]
                    await c.wait(lambda rid=rid: bool(c.streams[rid].tokens))
                    t1 = time.perf_counter()
                    await c.wait(lambda rid=rid: c.streams[rid].done is not None)
                    t2 = time.perf_counter()
                    if i >= 10:  # warm-up
                        ttft.append((t1 - t0) * 1000)
                        total.append((t2 - t0) * 1000)
        finally:
            await c.close()
    return {
        "requests": len(ttft),
        "submit_to_first_token_ms": {
            "p50": _pct(ttft, 0.5),
            "p99": _pct(ttft, 0.99),
            "mean": round(statistics.fmean(ttft), 2) if ttft else float("nan"),
        },
        "submit_to_done_ms": {"p50": _pct(total, 0.5), "p99": _pct(total, 0.99)},
        "note": "echo worker answers at once: the figures are the gateway + 2 Kafka hops",
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    counts: list[int] = args.gateway_sockets
    wanted = max(counts) * 2 + 1024
    limit = raise_open_files(wanted)
    result: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "open_files_limit": limit,
        "open_files_wanted": wanted,
        "open_files_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }
    t = await testing.create_topics(config.kafka_bootstrap(), partitions=4)
    try:
        async with fresh_database(config.database_url()) as db:
            async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
                await conn.execute(  # a tier whose socket cap is above every count here
                    "INSERT INTO quota_tiers VALUES ('bench', 1000000, 1000000000000,"
                    " 1000000000000, 100000, 100000, 1000000)"
                )
            name = f"bench-{uuid.uuid4().hex[:8]}"
            await admin.create_tenant(name, "bench", db)
            key = (await admin.create_key(name, db)).key
            result["idle"] = []
            for n in counts:
                runs = []
                for r in range(args.gateway_repeat):
                    one = await idle_sockets(t, db, key, n, args.gateway_hold_s)
                    print(
                        f"gateway: {n} idle sockets (run {r + 1}/{args.gateway_repeat}): "
                        f"{one['idle_socket_kib']} KiB each, {one['held']} held, "
                        f"opened in {one['open_s']} s",
                        file=sys.stderr,
                    )
                    runs.append(one)
                ordered = sorted(runs, key=lambda x: float(x["idle_socket_kib"]))
                median = dict(ordered[len(ordered) // 2])
                median["idle_socket_kib_min"] = ordered[0]["idle_socket_kib"]
                median["idle_socket_kib_max"] = ordered[-1]["idle_socket_kib"]
                median["held_min"] = min(x["held"] for x in runs)
                result["idle"].append(median)
            result.update(await latency(t, db, key, args.gateway_requests))
    finally:
        await testing.delete_topics(t)
    result["facts"] = [
        {
            "what": f"gateway idle WebSocket at {x['sockets']:,} sockets (median of "
            f"{args.gateway_repeat})",
            "value": f"{x['idle_socket_kib']} KiB [{x['idle_socket_kib_min']}-"
            f"{x['idle_socket_kib_max']}], {x['held_min']:,} held",
        }
        for x in result["idle"]
    ]
    lat = result["submit_to_first_token_ms"]
    result["facts"].append(
        {
            "what": "gateway-in -> Kafka -> gateway-out, instant echo worker",
            "value": f"p50 {lat['p50']} ms, p99 {lat['p99']} ms",
        }
    )
    result["goals"] = goals(result["idle"])
    for goal in result["goals"]:
        print(f"{goal['result']:<4} {goal['goal']}: {goal['measured']}", file=sys.stderr)
    return result


def goals(idle: list[dict[str, Any]]) -> list[dict[str, str]]:
    check = loadgen.check
    out = []
    for x in idle:
        kib = x["idle_socket_kib"]
        out.append(
            check(
                f"idle WebSocket <= {IDLE_SOCKET_GOAL_KIB} KiB at {x['sockets']:,} sockets",
                kib <= IDLE_SOCKET_GOAL_KIB,
                f"{kib} KiB",
            )
        )
    if idle:  # judged at the largest count tried: fewer than the goal's sockets is a MISS
        x = max(idle, key=lambda x: int(x["sockets"]))
        ok = x["held_min"] >= HELD_SOCKETS_GOAL and x["gateway_alive"]
        note = "" if x["sockets"] >= HELD_SOCKETS_GOAL else f" ({HELD_SOCKETS_GOAL:,} not tried)"
        out.append(
            check(
                f"{HELD_SOCKETS_GOAL:,} sockets held by one gateway process",
                ok,
                f"{x['held_min']:,} of {x['sockets']:,} held{note}",
            )
        )
    return out
