"""`llmstream chaos`: inject each fault while requests stream, then check every invariant.

One private infrastructure instance (`chaos.infra`), one `local_stack` on it (two gateway
replicas, two workers, two synthetic model server replicas, the aggregator), then one phase
per fault, each with its own tenant so billing is checked per phase:

1. clients (`chaos.client.Session`, spread over both gateways) submit `requests` greedy
   requests of known prompts and wait until every one is streaming;
2. the fault is injected, with evidence that it took effect (a pid gone, a port closed, a
   server's run id or pid changed); a killed process is started again at once, as a
   supervisor would (the only restart anybody makes). Meanwhile two probe sessions submit new
   requests until every stream flows again: each must be served whole or refused with an
   error a client can act on;
3. when every request has ended, `chaos.check` judges each one against the synthetic engine's
   uninterrupted output, the event log and the ledger, the tenant's bills across the ledger,
   `usage_daily`, Redis and the aggregator's duplicate-bill counter, and measures how long the
   in-flight streams were silent.

For a link fault (`worker-link`, `gateway-delay`) the process first moves into its own network
namespace for the phase (`chaos.netns`). `--soak 30m` alternates steady traffic and faults for
that long and judges every process' RSS and fds for growth (`chaos.soak`). docs/chaos.md.

Results: a table on stdout and `bench/results/<stamp>-chaos.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc

from llmstream import config
from llmstream.fold import fold_all
from llmstream_tools import infra
from llmstream_tools.chaos import check, netns, owner, recovery, stores
from llmstream_tools.chaos.client import Session
from llmstream_tools.chaos.faults import (
    DuplicateBills,
    Phase,
    flowing,
    inject,
    wait_sessions,
    zombie_out_ms,
)
from llmstream_tools.chaos.infra import private_infra
from llmstream_tools.chaos.options import (
    CLUSTER_FAULTS,
    FAULTS,
    GOALS,
    NET_FAULTS,
    RESULTS_DIR,
    SAMPLED,
    STEADY,
    STEADY_TEXT,
    ZOMBIE,
    Options,
    default_faults,
    parse_duration,
    soak_faults,
)
from llmstream_tools.chaos.report import summary
from llmstream_tools.stack import Stack, local_stack

log = logging.getLogger("llmstream_tools.chaos")


def prompt(i: int) -> str:
    return f"chaos request {i}: tell me a story"


def probe_prompt(i: int) -> str:
    return f"chaos probe {i}: submitted during the fault"


async def reference_texts(wanted: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """The uninterrupted output of each (prompt, max_tokens), from an in-process synthetic
    model server (the same engine and server code as the stack's, without pacing)."""
    from llmstream.v1 import model_service_pb2_grpc
    from llmstream_tools.testing.model_server import generate, running_server, start, synthetic_spec

    spec = synthetic_spec(ttft_ms=0, itl_ms=0, max_queue=len(wanted) + 1)
    out: dict[tuple[str, int], str] = {}
    async with running_server([spec]) as (_server, channel):
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        slots = asyncio.Semaphore(32)

        async def one(i: int, text: str, max_tokens: int) -> None:
            async with slots:
                res = await generate(
                    stub,
                    start("synthetic", text=text, request_id=f"ref-{i}", max_tokens=max_tokens),
                )
            if res.code != grpc.StatusCode.OK or len(res.finishes) != 1:
                raise RuntimeError(f"reference run failed: {res.code} {res.details}")
            out[(text, max_tokens)] = res.text

        await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(wanted)))
    return out


async def _probe(
    phase: Phase, injected: asyncio.Event, in_flight: list[check.ClientStream]
) -> None:
    """New submits, alternating gateways, until the fault is over and every stream that was
    in flight flows again (or `max_probes`)."""
    opts = phase.opts
    for i in range(opts.max_probes):
        session = phase.probe_sessions[i % len(phase.probe_sessions)]
        probe = check.Probe(f"p{i}", probe_prompt(i))
        phase.probes.append(probe)
        await session.submit(probe.ref, probe.prompt, opts.probe_tokens)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(injected.wait(), opts.probe_interval_s)
        if injected.is_set() and flowing(in_flight, phase.marks["injected"]):
            return
        if injected.is_set():
            await asyncio.sleep(opts.probe_interval_s)


def _probe_outcomes(phase: Phase) -> None:
    for i, probe in enumerate(phase.probes):
        session = phase.probe_sessions[i % len(phase.probe_sessions)]
        probe.refusal = session.refused.get(probe.ref)
        rid = session.accepted.get(probe.ref)
        probe.stream = session.streams.get(rid) if rid is not None else None


async def run_fault(
    stack: Stack,
    fault: str,
    opts: Options,
    expected: dict[tuple[str, int], str],
    bills: DuplicateBills,
) -> check.FaultResult:
    result = check.FaultResult(fault, requests=opts.requests, goal=GOALS.get(fault, ""))
    started = time.monotonic()
    tenant_id, key = await stack.tenant_key("enterprise")
    ports = stack.gateway_ports
    phase = Phase(
        fault,
        stack,
        opts,
        sessions=[Session(ports, i, key, f"{fault}-{i}") for i in range(opts.sockets)],
        probe_sessions=[Session(ports, i, key, f"{fault}-probe-{i}") for i in range(2)],
    )
    async with contextlib.AsyncExitStack() as scope:
        if fault in NET_FAULTS:  # the process moves into its own network namespace
            try:
                phase.link = await scope.enter_async_context(
                    netns.isolated(stack, NET_FAULTS[fault])
                )
            except netns.NamespaceRefused as exc:
                result.skipped = str(exc)
                return result
        bills_before = await bills.sample()
        if fault == STEADY:
            await _paced_traffic(phase, result)
        else:
            await _streams_through_fault(phase, result, bills)
        # Before a namespace's process moves back: it must not have died in there.
        result.dead_processes = sorted(n for n, p in stack.procs.items() if p.poll() is not None)
    for name in result.dead_processes:  # so that the next phase runs on a whole stack
        if stack.procs[name].poll() is not None:
            stack.start(name)
    _probe_outcomes(phase)
    result.extra.update(phase.extra, steps=phase.steps)
    await _judge(phase, tenant_id, expected, result, bills, bills_before)
    evidence = [e for e in phase.evidence if e]
    result.proof = "; ".join(evidence) if evidence or phase.evidence else "no evidence taken"
    result.seconds = time.monotonic() - started
    return result


async def _streams_through_fault(
    phase: Phase, result: check.FaultResult, bills: DuplicateBills
) -> None:
    """Submit the phase's requests, inject the fault once all stream (probing with new
    submits meanwhile), and wait until every request has ended."""
    fault, opts = phase.fault, phase.opts
    tokens = opts.tokens(fault)
    every = [*phase.sessions, *phase.probe_sessions]
    try:
        await asyncio.gather(*(s.start() for s in every))
        for i in range(opts.requests):
            session = phase.sessions[i % len(phase.sessions)]
            await session.submit(f"q{i}", prompt(i), tokens, SAMPLED.get(fault, 0.0))
        if not await wait_sessions(phase.sessions, lambda s: s.unanswered() == 0, 60):
            raise RuntimeError(f"{fault}: submits not answered within 60 s")
        refused = [f for s in phase.sessions for f in s.refused.values()]
        if refused:
            raise RuntimeError(f"{fault}: {len(refused)} submits refused, e.g. {refused[0]}")
        streaming = await wait_sessions(
            phase.sessions, lambda s: all(st.tokens for st in s.streams.values()), 60
        )
        if not streaming:
            raise RuntimeError(f"{fault}: not every request was streaming within 60 s")
        streams = phase.streams()
        fault_at = time.monotonic()
        phase.marks["fault"] = fault_at
        in_flight = [st for st in streams.values() if not st.dones]
        result.in_flight = len(in_flight)
        log.info("injecting", extra={"fields": {"fault": fault, "in_flight": result.in_flight}})
        injected = asyncio.Event()
        prober = asyncio.create_task(_probe(phase, injected, in_flight))
        try:
            await inject(phase, bills, in_flight)
        except BaseException:
            prober.cancel()
            raise
        finally:
            injected.set()
        result.outage_s = phase.marks["injected"] - fault_at
        budget = tokens * opts.itl_ms / 1000 + 120
        await prober
        if not await wait_sessions(
            every, lambda s: not s.unfinished() and not s.unanswered(), budget
        ):
            result.notes.append(f"requests unfinished {budget:.0f} s after the fault")
        _measure(phase, result, streams)
    finally:
        await asyncio.gather(*(s.close() for s in every))


async def _paced_traffic(phase: Phase, result: check.FaultResult) -> None:
    """Steady traffic without a fault (a soak's between faults): the phase's requests are
    submitted evenly over `soak_gap_s`, then every one must end; each request's stall is its
    longest silence from its submit on."""
    opts = phase.opts
    tokens = opts.tokens(STEADY)
    try:
        await asyncio.gather(*(s.start() for s in phase.sessions))
        phase.marks["fault"] = time.monotonic()
        for i in range(opts.requests):
            session = phase.sessions[i % len(phase.sessions)]
            await session.submit(f"q{i}", prompt(i), tokens)
            await asyncio.sleep(opts.soak_gap_s / opts.requests)
        budget = tokens * opts.itl_ms / 1000 + 120
        if not await wait_sessions(
            phase.sessions, lambda s: not s.unfinished() and not s.unanswered(), budget
        ):
            result.notes.append(f"requests unfinished {budget:.0f} s after the last submit")
        streams = phase.streams()
        result.in_flight = len(streams)
        result.stall = recovery.spread(
            recovery.longest_silences(streams.values(), phase.marks["fault"])
        )
    finally:
        await asyncio.gather(*(s.close() for s in phase.sessions))
    phase.evidence.append("")  # no fault to prove
    phase.step("injected")


def _measure(
    phase: Phase, result: check.FaultResult, streams: dict[str, check.ClientStream]
) -> None:
    """Silences of the in-flight streams, and what the fault's goal bounds."""
    fault_at = phase.marks["fault"]
    result.stall = recovery.spread(recovery.longest_silences(streams.values(), fault_at))
    if phase.fault == "gateway":
        # Reconnect -> first frame of each stream that was open on the dead socket.
        waits: list[float | None] = []
        for s in phase.sessions:
            later = [t for t in s.reconnected_at if t > fault_at]
            if later:
                waits += recovery.first_frames_after(s.streams.values(), later[0])
        result.goal_measure = recovery.spread(waits)
    if phase.fault in NET_FAULTS:  # the link works again -> each stream's next frame
        restored = recovery.first_frames_after(streams.values(), phase.marks["restored"])
        result.extra["link_restored_to_flowing_s"] = asdict(recovery.spread(restored))
    if "back" in phase.marks:  # brokers answer again -> each stream's next frame
        back = recovery.spread(recovery.first_frames_after(streams.values(), phase.marks["back"]))
        result.extra["broker_back_to_flowing_s"] = asdict(back)
        if phase.fault in ("kafka", "kafka-kill"):
            result.goal_measure = back
    if phase.fault == "kafka-leader":
        leader = recovery.longest_silences(
            streams.values(), fault_at, until=phase.marks["follower_killed"]
        )
        result.goal_measure = recovery.spread(leader)
    result.extra["reconnects"] = sum(s.reconnects for s in phase.sessions)
    result.extra["close_codes"] = sorted({str(c) for s in phase.sessions for c in s.close_codes})


async def _judge(
    phase: Phase,
    tenant_id: str,
    expected: dict[tuple[str, int], str],
    result: check.FaultResult,
    bills: DuplicateBills,
    bills_before: float,
) -> None:
    from llmstream_tools.testing.worker import read_all

    stack, opts = phase.stack, phase.opts
    streams = phase.streams()
    probe_streams = {p.stream.request_id: p for p in phase.probes if p.stream is not None}
    wanted = set(streams) | set(probe_streams)
    bootstrap = config.kafka_bootstrap()
    events = await read_all(bootstrap, stack.tokens_topic)
    events += await read_all(bootstrap, stack.prompts_topic)
    states = fold_all(e for e in events if e.request_id in wanted)
    terminal = sum(1 for st in states.values() if st.terminal)
    result.extra["takeovers"] = sum(1 for st in states.values() if st.attempts > 1)
    result.extra["log_duplicate_deltas"] = sum(st.duplicates for st in states.values())
    result.extra["fenced_events"] = sum(st.fenced for st in states.values())
    reasons: dict[str, int] = {}
    for st in states.values():
        reason = st.finish_reason or st.status.value
        reasons[reason] = reasons.get(reason, 0) + 1
    result.extra["finish_reasons"] = reasons

    # The aggregator may still be catching up (it was killed, or PostgreSQL was away).
    deadline = time.monotonic() + 90
    while True:
        ledger, daily = await stores.ledger(stack.database_url, tenant_id)
        if sum(r.rows for r in ledger.values()) >= terminal or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    tokens = opts.tokens(phase.fault)
    truths = {}
    if phase.fault == "zombie":
        zombie = stack.commands[ZOMBIE][stack.commands[ZOMBIE].index("--id") + 1]
        out_ms = zombie_out_ms(stack, phase.extra["frozen_at_ms"])
        result.extra["zombie_out_ms"] = out_ms
        truths = owner.owner_truth((e for e in events if e.request_id in wanted), zombie, out_ms)
        result.extra["zombie_late_events"] = sum(t.late_events for t in truths.values())
        result.extra["taken_over"] = sum(t.taken_over for t in truths.values())
    verdicts = []
    for rid, cs in streams.items():
        truth = truths.get(rid)
        text = truth.text if truth is not None else expected.get((cs.prompt, tokens), "")
        verdict = check.judge_request(cs, text, states.get(rid), ledger.get(rid))
        if truth is not None:
            owner.judge_owner(verdict, states.get(rid), truth)
        verdicts.append(verdict)
    probes = []
    for p in phase.probes:
        v = None
        if p.stream is not None:
            rid = p.stream.request_id
            text = expected.get((p.prompt, opts.probe_tokens), "")
            v = check.judge_request(p.stream, text, states.get(rid), ledger.get(rid))
        probes.append((check.judge_probe(p, v), v))
    # Settlement in Redis follows the ledger (an outbox): wait until it agrees, or give up.
    deadline = time.monotonic() + 30
    while True:
        billing = await stores.tenant_billing(tenant_id, ledger, daily)
        billing.duplicate_bill_counter = int(await bills.sample() - bills_before)
        findings = check.judge_tenant(billing)
        if not (findings.mismatches or findings.double_bills) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
        ledger, daily = await stores.ledger(stack.database_url, tenant_id)
    result.extra["billing"] = asdict(billing)
    check.tally(result, verdicts, findings, probes)


def check_faults(opts: Options) -> None:
    unknown = [f for f in opts.faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    if opts.brokers < 3 and any(f in CLUSTER_FAULTS for f in opts.faults):
        raise ValueError(f"{', '.join(CLUSTER_FAULTS)} need --brokers 3")


async def expected_texts(opts: Options) -> dict[tuple[str, int], str]:
    """The reference text of every prompt the faults of `opts` (and steady traffic) submit."""
    lengths = sorted({opts.tokens(f) for f in [*opts.faults, STEADY]})
    wanted = [(prompt(i), n) for n in lengths for i in range(opts.requests)]
    wanted += [(probe_prompt(i), opts.probe_tokens) for i in range(opts.max_probes)]
    return await reference_texts(wanted)


@contextlib.asynccontextmanager
async def deployment(opts: Options, workdir: Path) -> AsyncIterator[Stack]:
    """The private infrastructure and the stack every phase runs on."""
    with private_infra(keep_logs=workdir, brokers=opts.brokers):
        async with local_stack(
            workdir,
            replication=min(3, opts.brokers),
            workers=2,
            partitions=4,
            itl_ms=opts.itl_ms,
            gateways=2,
            model_servers=2,
            metrics=True,
        ) as stack:
            yield stack


async def run_phase(
    stack: Stack,
    fault: str,
    opts: Options,
    expected: dict[tuple[str, int], str],
    bills: DuplicateBills,
) -> check.FaultResult:
    """`run_fault`, with its progress and row on stderr."""
    print(f"== {fault}: {FAULTS.get(fault, STEADY_TEXT)}", file=sys.stderr, flush=True)
    result = await run_fault(stack, fault, opts, expected, bills)
    print(check.table([result]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"   {json.dumps(result.extra)}", file=sys.stderr, flush=True)
    for example in result.examples:
        print(f"   {example}", file=sys.stderr)
    return result


async def run(opts: Options, workdir: Path) -> list[check.FaultResult]:
    """Every fault of `opts`, one after another, on one private stack. Blocks ~1 min + the
    phases (about 20-30 s each, plus the stall and broker outage)."""
    check_faults(opts)
    expected = await expected_texts(opts)
    async with deployment(opts, workdir) as stack:
        bills = DuplicateBills(stack)
        return [await run_phase(stack, f, opts, expected, bills) for f in opts.faults]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Options()
    parser.add_argument(
        "--faults",
        help="comma-separated, in order (default: every fault the brokers allow); known: "
        + ", ".join(FAULTS),
    )
    parser.add_argument(
        "--brokers",
        type=int,
        choices=(1, 3),
        help=f"Kafka nodes of the private instance (default {d.brokers}; --quick: 1); "
        f"{', '.join(CLUSTER_FAULTS)} need 3",
    )
    parser.add_argument("--requests", type=int, help=f"per fault (default {d.requests})")
    parser.add_argument("--quick", action="store_true", help="the quick version `make test` runs")
    parser.add_argument("--stall-s", type=float, help=f"client stall (default {d.stall_s})")
    parser.add_argument(
        "--kafka-down-s", type=float, help=f"broker outage (default {d.kafka_down_s})"
    )
    parser.add_argument("--max-tokens", type=int, help=f"per request (default {d.max_tokens})")
    parser.add_argument(
        "--link-down-s", type=float, help=f"worker-link: link cut (default {d.link_down_s:g})"
    )
    parser.add_argument(
        "--link-delay-ms",
        type=float,
        help=f"gateway-delay: added round trip (default {d.link_delay_ms:g})",
    )
    parser.add_argument(
        "--link-delay-s",
        type=float,
        help=f"gateway-delay: for how long (default {d.link_delay_s:g})",
    )
    parser.add_argument(
        "--soak",
        type=_duration,
        metavar="DURATION",
        help="soak for this long (e.g. 30m): steady traffic, a fault every --soak-gap, RSS and "
        "fds of every process judged for growth",
    )
    parser.add_argument(
        "--soak-gap",
        type=_duration,
        metavar="DURATION",
        help=f"steady traffic between two faults of a soak (default {d.soak_gap_s:g}s)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def options_from(args: argparse.Namespace) -> Options:
    overrides: dict[str, Any] = {}
    names = ("brokers", "requests", "stall_s", "kafka_down_s", "max_tokens")
    for name in (*names, "link_down_s", "link_delay_ms", "link_delay_s"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    opts = Options.quick_version(**overrides) if args.quick else replace(Options(), **overrides)
    if args.soak is not None:
        opts = replace(opts, soak_s=args.soak)
    if args.soak_gap is not None:
        opts = replace(opts, soak_gap_s=args.soak_gap)
    faults = [f for f in args.faults.split(",") if f] if args.faults else None
    if faults is None and opts.soak_s:
        faults = soak_faults(opts.brokers)
    return replace(opts, faults=faults or default_faults(opts.brokers, opts.quick))


def record(
    opts: Options, results: Sequence[check.FaultResult], stamp: str, seconds: float
) -> dict[str, Any]:
    """The JSON written to the results dir (and published under docs/results/)."""
    from llmstream_tools.bench.cli import machine

    return {
        "suite": "chaos",
        "started_at": stamp,
        "seconds": round(seconds, 1),
        "machine": machine(),
        "options": asdict(opts),
        "ok": all(r.ok for r in results),
        "table": check.table(results),
        "results": [
            {**asdict(r), "kept": r.kept, "goal_result": r.goal_result, "ok": r.ok} for r in results
        ],
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmstream chaos", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    opts = options_from(args)
    if any(f not in FAULTS for f in opts.faults):
        parser.error(f"--faults: known are {', '.join(FAULTS)}")
    if opts.brokers < 3 and any(f in CLUSTER_FAULTS for f in opts.faults):
        parser.error(f"--faults: {', '.join(CLUSTER_FAULTS)} need --brokers 3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="llmstream-chaos-logs-"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    started = time.time()
    soak_record: dict[str, Any] | None = None
    try:
        if opts.soak_s:
            from llmstream_tools.chaos.soak import soak

            results, soak_record = asyncio.run(soak(opts, workdir))
        else:
            results = asyncio.run(run(opts, workdir))
    except infra.InfraError as exc:  # the private instance could not start: one line
        print(f"llmstream chaos: {exc}", file=sys.stderr)
        return 1
    data = record(opts, results, stamp, time.time() - started)
    if soak_record is not None:
        data["soak"] = soak_record
        data["ok"] = data["ok"] and soak_record["ok"]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{stamp}-chaos.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(summary(data))
    print(f"results: {path}", file=sys.stderr)
    if data["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"service logs: {workdir}", file=sys.stderr)
    return 0 if data["ok"] else 1
