"""Every service's /metrics after real traffic through the whole pipeline (gateway -> Kafka ->
workers -> synthetic model server -> gateway, aggregator projecting), and `llmstream top`
against the same processes.

Counts must equal what the test did (requests, tokens, events read back from the clients),
histograms must hold one observation per request, gauges must settle at their idle values,
and every metric the code declares (llmstream_tools/metric_catalog.py) must be exported, except the
few that only appear once their event happens.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llmstream_tools import metric_catalog
from llmstream_tools import promstats as ps
from llmstream_tools.stack import Stack, local_stack
from llmstream_tools.testing.gateway import Client

pytestmark = pytest.mark.integration

SOCKETS = 3
PER_SOCKET = 20
N = SOCKETS * PER_SOCKET
MAX_TOKENS = 8
WORKERS = 2
# Declared, but only exported once their event happened (none does in this test).
ONLY_AFTER_EVENT = {
    "llmstream_requests_rejected_total",  # a Generate call refused before starting
    "llmstream_aggregator_bad_events_total",  # first bad event (labelled by reason)
    "llmstream_aggregator_dead_letters_total",  # first dead letter (labelled by result)
}
SERVICE_OF = {"gateway": "gateway", "model-server": "model_server", "aggregator": "aggregator"}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with local_stack(tmp_path, workers=WORKERS, metrics=True) as s:
        yield s


def scrape(port: int) -> ps.Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return ps.parse(resp.read().decode(), extra={"port": str(port)})


def scrape_all(stack: Stack) -> dict[str, ps.Scrape]:
    """Service -> merged scrape of its processes (the two workers become one)."""
    parts: dict[str, list[ps.Scrape]] = {}
    for name, port in stack.metrics_ports.items():
        service = SERVICE_OF.get(name, "worker")
        parts.setdefault(service, []).append(scrape(port))
    return {svc: ps.merge(p) for svc, p in parts.items()}


def value(s: ps.Scrape, name: str, **where: str) -> float:
    found = ps.total(s, name, where)
    assert found is not None, f"no series {name}{where or ''}"
    return found


async def traffic(port: int, key: str, marker: str, sockets: int, per_socket: int) -> list[Any]:
    """`sockets` clients, each with its requests open at once; every done frame."""

    async def one(i: int) -> list[Any]:
        c = await Client.connect(port, key)
        try:
            await c.wait(lambda: c.hello is not None)
            for j in range(per_socket):
                await c.submit(f"{i}-{j}", max_tokens=MAX_TOKENS, prompt=f"{marker} {i}-{j}")
            await c.wait(lambda: sum(1 for s in c.streams.values() if s.done) == per_socket, 60)
            assert not c.errors, c.errors
            return [s.done for s in c.streams.values()]
        finally:
            await c.close()

    done = await asyncio.gather(*(one(i) for i in range(sockets)))
    return [d for ds in done for d in ds]


async def keep_busy(port: int, key: str, marker: str, stop: asyncio.Event) -> list[Any]:
    """Closed loop on one socket (a few requests open at a time) until `stop`; done frames."""
    c = await Client.connect(port, key)
    try:
        await c.wait(lambda: c.hello is not None)
        sent = 0
        while not stop.is_set():
            for _ in range(4):
                await c.submit(f"busy-{sent}", max_tokens=MAX_TOKENS, prompt=f"{marker} {sent}")
                sent += 1
            await c.wait(lambda n=sent: sum(1 for s in c.streams.values() if s.done) == n, 60)
        assert not c.errors, c.errors
        return [s.done for s in c.streams.values()]
    finally:
        await c.close()


async def top(stack: Stack, *args: str) -> str:
    ports = stack.metrics_ports
    targets = {
        "--gateway": [ports["gateway"]],
        "--model-server": [ports["model-server"]],
        "--worker": [ports[f"worker-{i}"] for i in range(WORKERS)],
        "--aggregator": [ports["aggregator"]],
    }
    flags = [
        x
        for flag, nums in targets.items()
        for x in (flag, ",".join(f"127.0.0.1:{n}" for n in nums))
    ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmstream_tools.cli", "top", "--once", *flags, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def until(cond: Any, within_s: float = 60.0) -> None:
    end = time.monotonic() + within_s
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.3)


async def test_every_service_exports_sane_metrics_and_top_summarizes_them(stack: Stack) -> None:
    _tenant, key = await stack.tenant_key("enterprise")
    marker = f"prompt-marker-{uuid.uuid4().hex}"

    # Traffic only once the workers' group is stable (each worker reports the lag of the
    # partitions it owns): a rebalance under traffic would move requests (takeovers) and make
    # the counts below inexact.
    def assigned() -> bool:
        owned = [
            {
                dict(k)["partition"]
                for k in scrape(stack.metrics_ports[f"worker-{i}"]).series(
                    "llmstream_worker_prompt_lag"
                )
            }
            for i in range(WORKERS)
        ]
        return all(owned) and set().union(*owned) == {"0", "1", "2", "3"}

    await until(assigned)

    # `top` over a window in which requests are flowing: rates above zero.
    stop = asyncio.Event()
    busy = asyncio.create_task(keep_busy(stack.gateway_port, key, marker, stop))
    await asyncio.sleep(0.3)
    try:
        live = await top(stack, "--interval", "1.5")
    finally:
        stop.set()
    warmup = await busy
    assert "unreachable" not in live, live
    rate = re.search(r"^gateway .* requests ([0-9.]+)/s, (\d+) total", live, re.M)
    assert rate is not None, live
    assert float(rate.group(1)) > 0, live
    assert re.search(r"^model server .* tokens ([0-9.]+)/s", live, re.M), live
    for line in ("worker ", "aggregator ", "errors        none"):
        assert any(x.startswith(line) for x in live.splitlines()), live

    # Measured traffic, with one idle socket left open and one malformed frame.
    idle = await Client.connect(stack.gateway_port, key)
    await idle.wait(lambda: idle.hello is not None)
    await idle.send('{"type": "launch"}')
    await idle.wait(lambda: bool(idle.errors))
    done = await traffic(stack.gateway_port, key, marker, SOCKETS, PER_SOCKET)
    done += warmup
    requests = len(done)
    assert requests > N
    tokens = sum(d["usage"]["completion_tokens"] for d in done)
    assert {d["finish_reason"] for d in done} <= {"length", "stop"}

    # The aggregator projects everything; workers commit every prompt.
    def settled() -> bool:
        s = scrape_all(stack)
        return (
            ps.total(s["aggregator"], "llmstream_aggregator_bills_total") == requests
            and ps.total(s["aggregator"], "llmstream_aggregator_lag_events") == 0
            and ps.total(s["worker"], "llmstream_worker_prompt_lag") == 0
            and ps.total(s["gateway"], "gateway_sockets") == 1
        )

    await until(settled)
    s = scrape_all(stack)
    g, w, m, a = s["gateway"], s["worker"], s["model_server"], s["aggregator"]
    # (Checked first: a rebalance during the test would explain every count below being off.)
    assert value(w, "llmstream_worker_takeovers_total") == 0, "requests moved between workers"

    # Every declared metric is exported under its documented name.
    names = metric_catalog.prometheus_names(metric_catalog.declared())
    for inst, name in names.items():
        if name in ONLY_AFTER_EVENT:
            continue
        sample = name + "_count" if inst.kind == "histogram" else name
        assert s[inst.service].series(sample), f"{inst.service}: {name} not exported"

    # Gateway: one request per done frame, client-side latencies once per request.
    assert ps.by_label(g, "gateway_requests_total", "outcome").keys() <= {"length", "stop"}
    assert value(g, "gateway_requests_total") == requests
    assert value(g, "gateway_submits_total", result="accepted") == requests
    assert value(g, "gateway_submits_total") == requests  # nothing refused
    assert value(g, "gateway_quota_refusals_total") == 0
    assert value(g, "gateway_invalid_frames_total") == 1
    assert value(g, "gateway_send_buffer_overflows_total") == 0
    assert value(g, "gateway_inflight_requests") == 0
    assert value(g, "gateway_time_to_first_token_seconds_count") == requests
    assert value(g, "gateway_e2e_request_latency_seconds_count") == requests
    ttft_sum = value(g, "gateway_time_to_first_token_seconds_sum")
    assert 0 < ttft_sum < value(g, "gateway_e2e_request_latency_seconds_sum")
    # started + deltas + terminal per request; a frame per accepted, token event and done.
    events = value(g, "gateway_token_events_total")
    token_events = value(w, "llmstream_worker_token_events_total")
    assert events == 2 * requests + token_events
    assert value(g, "gateway_frames_sent_total") >= 2 * requests + token_events

    # Workers (both together).
    assert value(w, "llmstream_worker_requests_total") == requests
    assert value(w, "llmstream_worker_tokens_total") == tokens
    assert requests <= token_events <= tokens
    assert value(w, "llmstream_worker_produce_latency_seconds_count") == requests
    assert value(w, "llmstream_worker_inflight") == 0
    lag = w.series("llmstream_worker_prompt_lag")
    assert {dict(k)["partition"] for k in lag} == {"0", "1", "2", "3"}  # one owner each
    assert all(v == 0 for v in lag.values())
    assert value(w, "llmstream_worker_dead_letters_total") == 0
    # A cold gRPC channel may answer the first calls UNAVAILABLE: each retry is logged once.
    retried = sum(
        log.read_text().count('"msg": "model server unavailable; retrying"')
        for log in stack.tmp.glob("worker-*.log")
    )
    assert value(w, "llmstream_worker_retries_total") == retried

    # Model server: vLLM-style series, one observation per request (ITL: per later token).
    assert value(m, "llmstream_request_success_total") == requests
    assert value(m, "llmstream_generation_tokens_total") == tokens
    assert value(m, "llmstream_time_to_first_token_seconds_count") == requests
    assert value(m, "llmstream_e2e_request_latency_seconds_count") == requests
    assert value(m, "llmstream_request_queue_time_seconds_count") == requests
    assert value(m, "llmstream_inter_token_latency_seconds_count") == tokens - requests
    assert value(m, "llmstream_num_requests_running") == 0
    assert value(m, "llmstream_num_requests_waiting") == 0
    assert value(m, "llmstream_model_info", state="ready") == 1
    # Engine TTFT is inside the client's: summed over the same requests it is smaller.
    assert value(m, "llmstream_time_to_first_token_seconds_sum") < ttft_sum

    # Aggregator: every record of both topics projected, one bill per request, no lag.
    assert value(a, "llmstream_aggregator_events_total", topic=stack.prompts_topic) == requests
    assert value(a, "llmstream_aggregator_events_total", topic=stack.tokens_topic) == events
    assert value(a, "llmstream_aggregator_bills_total") == requests
    assert value(a, "llmstream_aggregator_duplicate_bills_total") == 0
    assert value(a, "llmstream_aggregator_lag_seconds") == 0
    assert value(a, "llmstream_aggregator_batch_duration_seconds_count") > 0

    # `top` without a window: totals equal the scraped ones.
    summary = json.loads(await top(stack, "--interval", "0", "--json"))
    assert summary["unreachable"] == {}
    assert summary["gateway"]["requests_total"] == requests
    assert summary["gateway"]["sockets"] == 1
    assert summary["model_server"]["tokens_total"] == tokens
    assert summary["worker"]["prompt_lag"] == 0
    assert summary["aggregator"]["lag_events"] == 0
    assert summary["errors"] == {"gateway invalid frames": 1}
    p50, p99 = summary["model_server"]["itl"]["p50"], summary["model_server"]["itl"]["p99"]
    assert 0 < p50 <= p99

    # Logs: structured lines, and no prompt text (LLMSTREAM_LOG_PROMPTS is off by default).
    await idle.close()
    for log in stack.tmp.glob("*.log"):
        text = log.read_text()
        assert marker not in text, f"prompt text in {log.name}"
        first = json.loads(text.splitlines()[0])
        assert {"ts", "level", "service", "msg"} <= first.keys()
