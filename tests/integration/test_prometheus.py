"""A real Prometheus (Debian's package, `make prometheus`) scraping a running local stack:
every PromQL expression of the Grafana dashboard returns a series under traffic, and the
alerting rules of deploy/prometheus/rules fire in Prometheus's own /api/v1/alerts when the
fault they name happens: a record dead-lettered (DeadLetterRecords), the aggregator stopped
while requests finish (BillingStalled), the model server stopped (ModelServerNotServing, and
WorkerRetriesExhausted for a request submitted then), the workers stopped while prompts arrive
(PromptLagGrowing). Each alert is inactive before its fault.

The rules are the deployed ones with one change: every `for:` is FOR (seconds, not minutes), so
an alert goes from pending to firing within the test; their expressions and range windows are
untouched. Prometheus scrapes and evaluates every INTERVAL_S. Grafana's `$__rate_interval`
becomes RATE_WINDOW (Grafana's own is at least four scrape intervals).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmstream import config, kafka
from llmstream.ports import free_port
from llmstream_tools import infra
from llmstream_tools.stack import Stack, local_stack
from llmstream_tools.testing.gateway import Client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INTERVAL_S = 1.0
FOR = "2s"
RATE_WINDOW = "30s"
WORKERS = 2


def alert_names(paths: list[Path]) -> set[str]:
    groups = [g for p in paths for g in yaml.safe_load(p.read_text())["groups"]]
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def rules_variant(out: Path) -> list[Path]:
    """The deployed rule files with every `for:` set to FOR."""
    written = []
    for path in sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml")):
        spec = yaml.safe_load(path.read_text())
        for group in spec["groups"]:
            for rule in group["rules"]:
                if "alert" in rule and "for" in rule:
                    rule["for"] = FOR
        out.mkdir(parents=True, exist_ok=True)
        written.append(out / path.name)
        written[-1].write_text(yaml.safe_dump(spec, sort_keys=False))
    assert written, "no rule files"
    return written


def dashboard_exprs() -> list[str]:
    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "llmstream.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return [e.replace("$__rate_interval", RATE_WINDOW) for e in exprs]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, dict[str, int]]]:
    """The stack and every process's /metrics port. The gateway watches the workers' prompt lag
    only with LLMSTREAM_GATEWAY_MAX_PROMPT_LAG set: a bound no test traffic comes near. The
    workers announce the model once (at start) for the whole test: with the model server or
    the workers gone, the gateway's catalog would otherwise drop the model after 3 announce
    intervals and refuse the prompts the faults need. Two retries: a request meets
    model_unavailable sooner."""
    gateway_metrics = free_port()
    env = {
        "LLMSTREAM_GATEWAY_METRICS_PORT": str(gateway_metrics),
        "LLMSTREAM_GATEWAY_MAX_PROMPT_LAG": "1000000",
        "LLMSTREAM_CATALOG_ANNOUNCE_S": "600",
        "LLMSTREAM_WORKER_RETRIES": "2",
    }
    async with local_stack(tmp_path, workers=WORKERS, metrics=True, extra_env=env) as s:
        ports = dict(s.metrics_ports)
        argv = s.commands["gateway"]
        # /metrics is on the gateway's --metrics-port when the stack passes one, else on the
        # LLMSTREAM_GATEWAY_METRICS_PORT above (never on its public port).
        ports["gateway"] = (
            int(argv[argv.index("--metrics-port") + 1])
            if "--metrics-port" in argv
            else gateway_metrics
        )
        yield s, ports


@pytest.fixture
async def prometheus(
    tmp_path: Path, stack: tuple[Stack, dict[str, int]]
) -> AsyncIterator[infra.PrometheusServer]:
    rules = rules_variant(tmp_path / "rules")
    server = await asyncio.to_thread(
        infra.start_prometheus, tmp_path / "prometheus", free_port(), stack[1], rules, INTERVAL_S
    )
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def api(server: infra.PrometheusServer, path: str, **params: str) -> Any:
    url = f"{server.url}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


async def query(server: infra.PrometheusServer, expr: str) -> list[dict[str, Any]]:
    data = await asyncio.to_thread(api, server, "query", query=expr)
    assert data["resultType"] == "vector", (expr, data)
    result: list[dict[str, Any]] = data["result"]
    return result


async def alert_state(server: infra.PrometheusServer, name: str) -> str | None:
    """'pending' or 'firing' while the alert is active, else None."""
    alerts = (await asyncio.to_thread(api, server, "alerts"))["alerts"]
    states = {a["state"] for a in alerts if a["labels"]["alertname"] == name}
    return "firing" if "firing" in states else next(iter(states), None)


async def until(
    what: str | Callable[[], str], cond: Callable[[], Awaitable[bool]], within_s: float = 60.0
) -> None:
    """Await `cond()` (a coroutine function) to be true; the time limit is a hang guard.
    `what` (or what it returns then) says what was awaited."""
    end = time.monotonic() + within_s
    while not await cond():
        if time.monotonic() > end:
            raise AssertionError(
                f"not within {within_s:.0f} s: {what if isinstance(what, str) else what()}"
            )
        await asyncio.sleep(0.3)


async def keep_busy(port: int, key: str, stop: asyncio.Event) -> int:
    """Closed loop on one socket (4 requests open at a time) until `stop`; requests done."""
    c = await Client.connect(port, key)
    try:
        await c.wait(lambda: c.hello is not None)
        sent = 0
        while not stop.is_set():
            for _ in range(4):
                await c.submit(f"busy-{sent}", max_tokens=8)
                sent += 1
            await c.wait(lambda n=sent: sum(1 for s in c.streams.values() if s.done) == n, 60)
        assert not c.errors, c.errors
        assert {s.done["finish_reason"] for s in c.streams.values() if s.done} == {"length"}
        return sent
    finally:
        await c.close()


async def write_undecodable_record(topic: str) -> None:
    producer = kafka.event_producer(kafka.Connection.from_env(config.ADMIN), "test-prometheus")
    await asyncio.wait_for(producer.start(), 15)
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b"\x00not an event", key=b"x"), 15)
    finally:
        await producer.stop()


async def test_dashboard_queries_and_alerts_on_a_real_prometheus(
    stack: tuple[Stack, dict[str, int]], prometheus: infra.PrometheusServer
) -> None:
    st, ports = stack
    prom = prometheus

    def inactive(name: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await alert_state(prom, name) is None

        return check

    # Prometheus sees every process, and has loaded and evaluated every rule.
    seen: list[dict[str, Any]] = []

    async def targets_up() -> bool:
        seen[:] = (await asyncio.to_thread(api, prom, "targets"))["activeTargets"]
        return len(seen) == len(ports) and all(t["health"] == "up" for t in seen)

    def targets() -> str:
        states = {t["labels"]["process"]: t["health"] + " " + t["lastError"] for t in seen}
        return f"every target of {sorted(ports)} scraped; Prometheus: {states}"

    await until(targets, targets_up)
    jobs = {r["metric"]["job"] for r in await query(prom, "up == 1")}
    assert jobs == {"gateway", "model-server", "worker", "aggregator"}

    deployed = alert_names(sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml")))

    async def rules_ok() -> bool:
        groups = (await asyncio.to_thread(api, prom, "rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        loaded = {r["name"] for r in rules if r["type"] == "alerting"}
        return loaded == deployed and all(r["health"] == "ok" for r in rules)

    await until("every rule evaluated", rules_ok)
    await until("DeadLetterRecords inactive", inactive("DeadLetterRecords"))

    # Traffic: a closed loop, one request longer than the model's context (a failure outcome
    # and a refused Generate call) and one undecodable record (a bad event, a dead letter).
    _tenant, key = await st.tenant_key("enterprise")
    stop = asyncio.Event()
    busy = asyncio.create_task(keep_busy(st.gateway_port, key, stop))
    c = await Client.connect(st.gateway_port, key)
    try:
        await c.submit("too-long", max_tokens=8, prompt="x" * 5000)
        rid = (await c.wait_ref("too-long", 20))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None, 30)
        done = c.streams[rid].done
        assert done is not None and done["error_code"] == "context_overflow", done
    finally:
        await c.close()
    await write_undecodable_record(st.tokens_topic)

    # Every dashboard expression returns a series.
    for expr in dashboard_exprs():

        async def answered(e: str = expr) -> bool:
            return bool(await query(prom, e))

        await until(f"a series for {expr}", answered)

    # The dead letter fires DeadLetterRecords (a series born at 1: the `unless offset` term).
    async def dead_letter_firing() -> bool:
        return await alert_state(prom, "DeadLetterRecords") == "firing"

    await until("DeadLetterRecords firing", dead_letter_firing)

    # Fault 1: the aggregator stopped while requests finish. Bills flow first, no alert.
    async def billing() -> bool:
        return bool(
            await query(prom, f"sum(rate(llmstream_aggregator_bills_total[{RATE_WINDOW}])) > 0")
        )

    await until("bills written", billing)
    await until("BillingStalled inactive while bills flow", inactive("BillingStalled"))
    st.kill("aggregator")

    async def billing_stalled() -> bool:
        return await alert_state(prom, "BillingStalled") == "firing"

    await until("BillingStalled firing", billing_stalled)
    assert not await query(prom, 'up{job="aggregator"} == 1')
    stop.set()
    assert await busy > 0

    # Fault 2: the model server stopped; a request submitted then fails after its retries.
    for name in ("ModelServerNotServing", "WorkerRetriesExhausted"):
        await until(f"{name} inactive", inactive(name))
    st.kill("model-server")
    c = await Client.connect(st.gateway_port, key)
    try:
        await c.submit("no-model-server", max_tokens=8)
        accepted = await c.wait_ref("no-model-server", 20)
        assert accepted["type"] == "accepted", accepted
        rid = accepted["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None, 60)
        done = c.streams[rid].done
        assert done is not None and done["error_code"] == "model_unavailable", done
    finally:
        await c.close()

    async def model_server_alerts() -> bool:
        states = [
            await alert_state(prom, name)
            for name in ("ModelServerNotServing", "WorkerRetriesExhausted")
        ]
        return states == ["firing", "firing"]

    await until("ModelServerNotServing and WorkerRetriesExhausted firing", model_server_alerts)

    # Fault 3: the workers stopped while prompts arrive. Every prompt finished first, no alert.
    async def caught_up() -> bool:
        lag = await query(prom, "max(gateway_prompt_lag)")
        return bool(lag) and float(lag[0]["value"][1]) == 0

    await until("prompt lag 0", caught_up)

    await until("PromptLagGrowing inactive", inactive("PromptLagGrowing"))
    for i in range(WORKERS):
        st.kill(f"worker-{i}")
    waiting = await Client.connect(st.gateway_port, key)
    try:
        await waiting.wait(lambda: waiting.hello is not None)
        sent = 0

        async def lag_growing() -> bool:
            nonlocal sent
            await waiting.submit(f"unserved-{sent}-{uuid.uuid4().hex[:6]}", max_tokens=8)
            sent += 1
            return await alert_state(prom, "PromptLagGrowing") == "firing"

        await until("PromptLagGrowing firing", lag_growing)
        assert not waiting.errors, waiting.errors
        assert not any(s.done for s in waiting.streams.values()), "no worker, yet a request ended"
        lag = await query(prom, "max(gateway_prompt_lag)")
        assert 0 < float(lag[0]["value"][1]) <= sent
    finally:
        await waiting.close()
