"""`llmstream chaos`: inject each fault while requests stream, then check every invariant.

One private infrastructure instance (`chaos.infra`), one `local_stack` on it (two gateway
replicas, two workers, two synthetic model server replicas, the aggregator), then one phase
per fault, each with its own tenant so billing is checked per phase:

1. clients (`chaos.client.Session`, spread over both gateways) submit `requests` greedy
   requests of known prompts and wait until every one is streaming;
2. the fault is injected; a killed process is started again at once, as a supervisor would
   (the only restart anybody makes);
3. when every request has ended, `chaos.check` judges each one against the synthetic engine's
   uninterrupted output, the event log, the ledger and the tenant's Redis counters, and
   measures the recovery time from the clients' frame arrival times.

Results: a table on stdout and `bench/results/<stamp>-chaos.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis.asyncio as aioredis

from llmstream import config, quota_keys
from llmstream.fold import fold_all
from llmstream_tools import infra
from llmstream_tools.chaos import check
from llmstream_tools.chaos.client import Session
from llmstream_tools.chaos.infra import private_infra
from llmstream_tools.stack import Stack, local_stack

log = logging.getLogger("llmstream_tools.chaos")

FAULTS: dict[str, str] = {
    "worker": "kill -9 a worker",
    "model-server": "kill -9 a model server replica",
    "gateway": "kill -9 the gateway replica half of the clients are connected to",
    "aggregator": "kill -9 the aggregator",
    "kafka": "stop the Kafka broker, start it again after --kafka-down-s",
    "redis": "restart Redis",
    "postgres": "restart PostgreSQL",
    "stall": "one client stops reading for --stall-s",
}
# Process of the stack each kill fault hits (the first replica).
_KILLS = {
    "worker": "worker-0",
    "model-server": "model-server",
    "gateway": "gateway",
    "aggregator": "aggregator",
}
RESULTS_DIR = Path("bench") / "results"


@dataclass
class Options:
    faults: list[str] = field(default_factory=lambda: list(FAULTS))
    requests: int = 100  # per fault, all in flight when it is injected
    sockets: int = 10
    max_tokens: int = 240
    itl_ms: float = 50.0  # synthetic engine: 240 tokens take ~12 s
    kafka_down_s: float = 10.0
    stall_s: float = 60.0
    # A stream that receives nothing this long is stalled (recovery_seconds).
    min_gap_s: float = 1.0
    quick: bool = False

    @classmethod
    def quick_version(cls, **overrides: Any) -> Options:
        """What `make test` runs: fewer and shorter streams, short outages (~2-3 min)."""
        quick = cls(
            requests=30, sockets=6, max_tokens=120, kafka_down_s=3.0, stall_s=5.0, quick=True
        )
        return replace(quick, **overrides)


def prompt(i: int) -> str:
    return f"chaos request {i}: tell me a story"


async def reference_texts(prompts: Sequence[str], max_tokens: int) -> dict[str, str]:
    """The uninterrupted output of each prompt, from an in-process synthetic model server
    (the same engine and server code as the stack's, without pacing)."""
    from llmstream.v1 import model_service_pb2_grpc
    from llmstream_tools.testing.model_server import generate, running_server, start, synthetic_spec

    spec = synthetic_spec(ttft_ms=0, itl_ms=0, max_queue=len(prompts) + 1)
    out: dict[str, str] = {}
    async with running_server([spec]) as (_server, channel):
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        slots = asyncio.Semaphore(32)

        async def one(i: int, text: str) -> None:
            async with slots:
                res = await generate(
                    stub,
                    start("synthetic", text=text, request_id=f"ref-{i}", max_tokens=max_tokens),
                )
            if res.code != grpc.StatusCode.OK or len(res.finishes) != 1:
                raise RuntimeError(f"reference run failed: {res.code} {res.details}")
            out[text] = res.text

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return out


async def _wait_sessions(sessions: Sequence[Session], cond: Any, within_s: float) -> bool:
    end = time.monotonic() + within_s
    for s in sessions:
        if not await s.wait(lambda s=s: cond(s), max(0.0, end - time.monotonic())):
            return False
    return True


async def _inject(
    fault: str, stack: Stack, sessions: Sequence[Session], opts: Options
) -> dict[str, float]:
    """Inject `fault`; returns how long its steps took (seconds), for the record."""
    steps: dict[str, float] = {}
    t = time.monotonic()

    def step(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        steps[name] = round(now - t, 2)
        t = now

    if fault in _KILLS:
        name = _KILLS[fault]
        await asyncio.to_thread(stack.kill, name)
        stack.start(name)  # what a supervisor does; nothing else is restarted by anyone
    elif fault == "kafka":
        await asyncio.to_thread(infra.stop_component, "kafka")
        step("stop_s")
        await asyncio.sleep(opts.kafka_down_s)
        step("down_s")
        await asyncio.to_thread(infra.start_component, "kafka")
        step("start_s")
    elif fault in ("redis", "postgres"):
        await asyncio.to_thread(infra.stop_component, fault)
        step("stop_s")
        await asyncio.to_thread(infra.start_component, fault)
        step("start_s")
    elif fault == "stall":
        await sessions[0].stall(opts.stall_s)
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    return steps


async def run_fault(
    stack: Stack, fault: str, opts: Options, expected: dict[str, str]
) -> check.FaultResult:
    result = check.FaultResult(fault, requests=opts.requests)
    started = time.monotonic()
    tenant_id, key = await stack.tenant_key("enterprise")
    ports = stack.gateway_ports
    sessions = [Session(ports, i, key, f"{fault}-{i}") for i in range(opts.sockets)]
    try:
        await asyncio.gather(*(s.start() for s in sessions))
        for i in range(opts.requests):
            await sessions[i % len(sessions)].submit(f"q{i}", prompt(i), opts.max_tokens)
        if not await _wait_sessions(sessions, lambda s: s.unanswered() == 0, 60):
            raise RuntimeError(f"{fault}: submits not answered within 60 s")
        refused = [f for s in sessions for f in s.refused]
        if refused:
            raise RuntimeError(f"{fault}: {len(refused)} submits refused, e.g. {refused[0]}")
        streaming = await _wait_sessions(
            sessions, lambda s: all(st.tokens for st in s.streams.values()), 60
        )
        if not streaming:
            raise RuntimeError(f"{fault}: not every request was streaming within 60 s")
        fault_at = time.monotonic()
        streams = {rid: st for s in sessions for rid, st in s.streams.items()}
        result.in_flight = sum(1 for st in streams.values() if not st.dones)
        log.info("injecting", extra={"fields": {"fault": fault, "in_flight": result.in_flight}})
        result.extra["steps"] = await _inject(fault, stack, sessions, opts)
        fault_end = time.monotonic()
        result.outage_s = fault_end - fault_at
        budget = opts.max_tokens * opts.itl_ms / 1000 + 120
        if not await _wait_sessions(sessions, lambda s: not s.unfinished(), budget):
            result.notes.append(f"requests unfinished {budget:.0f} s after the fault")
        per_stream = check.stream_recoveries(streams.values(), fault_at, fault_end, opts.min_gap_s)
        result.recovery_s = check.recovery_seconds(
            streams.values(), fault_at, fault_end, opts.min_gap_s
        )
        stalled = sorted(r for r in per_stream if r)
        result.extra["stalled_streams"] = len(stalled)
        result.extra["stall_median_s"] = round(stalled[len(stalled) // 2], 2) if stalled else 0
        result.extra["reconnects"] = sum(s.reconnects for s in sessions)
        result.extra["close_codes"] = sorted({str(c) for s in sessions for c in s.close_codes})
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    result.dead_processes = sorted(n for n, p in stack.procs.items() if p.poll() is not None)
    for name in result.dead_processes:  # so that the next phase runs on a whole stack
        stack.start(name)
    await _judge(stack, tenant_id, streams, expected, result)
    result.seconds = time.monotonic() - started
    return result


async def _judge(
    stack: Stack,
    tenant_id: str,
    streams: dict[str, check.ClientStream],
    expected: dict[str, str],
    result: check.FaultResult,
) -> None:
    from llmstream_tools.testing.worker import read_all

    bootstrap = config.kafka_bootstrap()
    events = await read_all(bootstrap, stack.tokens_topic)
    events += await read_all(bootstrap, stack.prompts_topic)
    states = fold_all(e for e in events if e.request_id in streams)
    terminal = sum(1 for st in states.values() if st.terminal)
    result.extra["takeovers"] = sum(1 for st in states.values() if st.attempts > 1)
    result.extra["log_duplicate_deltas"] = sum(st.duplicates for st in states.values())
    reasons: dict[str, int] = {}
    for st in states.values():
        reason = st.finish_reason or st.status.value
        reasons[reason] = reasons.get(reason, 0) + 1
    result.extra["finish_reasons"] = reasons

    # The aggregator may still be catching up (it was killed, or PostgreSQL was away).
    deadline = time.monotonic() + 90
    while True:
        async with await psycopg.AsyncConnection.connect(
            stack.database_url, connect_timeout=10
        ) as conn:
            cur = await conn.execute(
                "SELECT request_id, count(*), sum(prompt_tokens), sum(completion_tokens)"
                " FROM usage_ledger WHERE tenant_id = %s GROUP BY request_id",
                (tenant_id,),
            )
            ledger = check.ledger_by_request(await cur.fetchall())
        if sum(r.rows for r in ledger.values()) >= terminal or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    verdicts = [
        check.judge_request(st, expected.get(st.prompt, ""), states.get(rid), ledger.get(rid))
        for rid, st in streams.items()
    ]
    total = sum(r.prompt_tokens + r.completion_tokens for r in ledger.values())
    r = aioredis.from_url(config.redis_url(), socket_timeout=5, socket_connect_timeout=5)
    try:
        deadline = time.monotonic() + 30
        now_ms = int(time.time() * 1000)
        while True:
            day = int(await r.get(quota_keys.tokens_day(tenant_id, now_ms)) or 0)
            open_streams = int(await r.zcard(quota_keys.streams(tenant_id)))
            quota = check.quota_mismatches(day, total, open_streams)
            if not quota or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await r.aclose()
    check.tally(result, verdicts, quota)


async def run(opts: Options, workdir: Path) -> list[check.FaultResult]:
    """Every fault of `opts`, one after another, on one private stack. Blocks ~1 min + the
    phases (about 20-30 s each, plus the stall and broker outage)."""
    unknown = [f for f in opts.faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    prompts = [prompt(i) for i in range(opts.requests)]
    expected = await reference_texts(prompts, opts.max_tokens)
    results: list[check.FaultResult] = []
    with private_infra(keep_logs=workdir):
        async with local_stack(
            workdir,
            workers=2,
            partitions=4,
            itl_ms=opts.itl_ms,
            gateways=2,
            model_servers=2,
        ) as stack:
            for fault in opts.faults:
                print(f"== {fault}: {FAULTS[fault]}", file=sys.stderr, flush=True)
                result = await run_fault(stack, fault, opts, expected)
                print(check.table([result]).splitlines()[-1], file=sys.stderr, flush=True)
                print(f"   {json.dumps(result.extra)}", file=sys.stderr, flush=True)
                for example in result.examples:
                    print(f"   {example}", file=sys.stderr)
                results.append(result)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Options()
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="comma-separated, in order; known: " + ", ".join(FAULTS),
    )
    parser.add_argument("--requests", type=int, help=f"per fault (default {d.requests})")
    parser.add_argument("--quick", action="store_true", help="the quick version `make test` runs")
    parser.add_argument("--stall-s", type=float, help=f"client stall (default {d.stall_s})")
    parser.add_argument(
        "--kafka-down-s", type=float, help=f"broker outage (default {d.kafka_down_s})"
    )
    parser.add_argument("--max-tokens", type=int, help=f"per request (default {d.max_tokens})")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def options_from(args: argparse.Namespace) -> Options:
    overrides: dict[str, Any] = {"faults": [f for f in args.faults.split(",") if f]}
    for name in ("requests", "stall_s", "kafka_down_s", "max_tokens"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return Options.quick_version(**overrides) if args.quick else replace(Options(), **overrides)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmstream chaos", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    try:
        opts = options_from(args)
        if any(f not in FAULTS for f in opts.faults):
            parser.error(f"--faults: known are {', '.join(FAULTS)}")
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="llmstream-chaos-logs-"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    started = time.time()
    try:
        results = asyncio.run(run(opts, workdir))
    except infra.InfraError as exc:  # the private instance could not start: one line
        print(f"llmstream chaos: {exc}", file=sys.stderr)
        return 1
    ok = all(r.ok for r in results)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{stamp}-chaos.json"
    from llmstream_tools.bench.cli import machine

    record = {
        "suite": "chaos",
        "started_at": stamp,
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
        "options": asdict(opts),
        "ok": ok,
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(check.table(results))
    print(f"results: {path}", file=sys.stderr)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"service logs: {workdir}", file=sys.stderr)
    return 0 if ok else 1
