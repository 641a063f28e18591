"""Gateway benchmark (`llmstream bench gateway`): idle-socket memory and the latency the
gateway path adds (socket in -> prompts topic -> worker -> tokens topic -> socket out).

A gateway process (`llmstream gateway`) runs against fresh topics; this process opens N idle
authenticated sockets and reads the gateway's RSS before and after; then it submits requests
one at a time, answered at once by an in-process echo worker (1 token + completed), and
reports submit -> first token and submit -> done percentiles. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from gateway import testing
from llmstream import admin, config
from llmstream.ports import free_port


def add_arguments(group: Any) -> None:
    group.add_argument("--gateway-sockets", type=int, default=1000, help="idle sockets to open")
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
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n_sockets: int = getattr(args, "gateway_sockets", 1000)
    n_requests: int = getattr(args, "gateway_requests", 300)
    t = await testing.create_topics(config.kafka_bootstrap(), partitions=4)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    await admin.create_tenant(name, "enterprise")
    key = (await admin.create_key(name)).key
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "LLMSTREAM_TOPIC_PROMPTS": t.prompts,
            "LLMSTREAM_TOPIC_TOKENS": t.tokens,
            "LLMSTREAM_LOG_LEVEL": "WARNING",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "llmstream"),
        "gateway",
        "--port",
        str(port),
        "--partitions",
        "0-3",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    clients: list[testing.Client] = []
    try:
        await _wait_healthy(port, proc)
        rss_before = _rss_kib(proc.pid)
        for _ in range(n_sockets):
            clients.append(await testing.Client.connect(port, key))
        await asyncio.sleep(1)
        rss_after = _rss_kib(proc.pid)
        per_socket = (rss_after - rss_before) / max(1, n_sockets)
        for c in clients[1:]:
            await c.close()
        c = clients[0]
        ttft: list[float] = []
        total: list[float] = []
        async with testing.FakeWorker(t):
            for i in range(n_requests):
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
        return {
            "idle_sockets": n_sockets,
            "gateway_rss_kib_before": rss_before,
            "gateway_rss_kib_after": rss_after,
            "idle_socket_kib": round(per_socket, 1),
            "requests": len(ttft),
            "submit_to_first_token_ms": {
                "p50": _pct(ttft, 0.5),
                "p99": _pct(ttft, 0.99),
                "mean": round(statistics.fmean(ttft), 2),
            },
            "submit_to_done_ms": {"p50": _pct(total, 0.5), "p99": _pct(total, 0.99)},
            "note": "echo worker answers at once: the figures are the gateway + 2 Kafka hops",
        }
    finally:
        for c in clients:
            if c.close_code is None:
                await c.close()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
        await testing.delete_topics(t)
