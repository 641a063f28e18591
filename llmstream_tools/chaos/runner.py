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

Results: a table on stdout and `bench/results/<stamp>-chaos.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis.asyncio as aioredis

from llmstream import config, quota_keys
from llmstream.fold import fold_all
from llmstream_tools import infra, promstats
from llmstream_tools.chaos import check
from llmstream_tools.chaos.client import Session
from llmstream_tools.chaos.infra import private_infra
from llmstream_tools.chaos.report import summary
from llmstream_tools.stack import Stack, local_stack

log = logging.getLogger("llmstream_tools.chaos")

FAULTS: dict[str, str] = {
    "worker": "kill -9 a worker",
    "model-server": "kill -9 a model server replica",
    "gateway": "kill -9 the gateway replica half of the clients are connected to",
    "aggregator": "kill -9 the aggregator",
    "redis": "restart Redis",
    "postgres": "restart PostgreSQL",
    "stall": "one client stops reading for --stall-s",
    "kafka": "stop every broker (controlled shutdown), start them again after --kafka-down-s",
    "kafka-kill": "kill -9 every broker, start them again after --kafka-down-s",
    "kafka-leader": "kill -9 the leader of a tokens partition, later one of its followers, "
    "start both again after --kafka-down-s (3 brokers)",
    "worker+leader": "kill -9 a worker while the tokens leader is killed (3 brokers)",
    "gateway+redis": "kill -9 a gateway replica while Redis restarts",
    "aggregator+postgres": "kill -9 the aggregator while PostgreSQL restarts",
    "zombie": "SIGSTOP a worker past its session timeout, SIGCONT once its requests were "
    "taken over (sampled requests: a zombie's continuation differs from the new owner's)",
}
# Faults that need a cluster: with one broker there is no leader to move.
CLUSTER_FAULTS = ("kafka-leader", "worker+leader")
# Process of the stack each kill fault hits (the first replica).
_KILLS = {
    "worker": "worker-0",
    "model-server": "model-server",
    "gateway": "gateway",
    "aggregator": "aggregator",
}
# The recovery goal each fault is measured against (check.GOALS).
_GOALS = {
    "worker": "worker kill -9",
    "gateway": "gateway kill -9",
    "kafka": "broker back",
    "kafka-kill": "broker back",
    "kafka-leader": "leader kill -9",
}
# Faults whose streams must outlast several steps (leader kill, follower kill, restarts).
_LONG = {"kafka-leader": 4}
# Sampled without a seed, so that an attempt's continuation is its own: the text to expect
# comes from the log (check.owner_truth), not from a reference run.
_SAMPLED = {"zombie": 1.0}
ZOMBIE = "worker-0"


# Left out of `make test`'s quick run: the broker's clean stop (its kill -9 is the harder
# case) and the zombie (tests/integration/test_zombie_worker.py runs it on its own).
QUICK_SKIPS = ("kafka", "zombie")


def default_faults(brokers: int, quick: bool = False) -> list[str]:
    return [
        f
        for f in FAULTS
        if (brokers >= 3 or f not in CLUSTER_FAULTS) and not (quick and f in QUICK_SKIPS)
    ]


RESULTS_DIR = Path("bench") / "results"
DUPLICATE_BILLS = "llmstream_aggregator_duplicate_bills_total"


@dataclass
class Options:
    faults: list[str] = field(default_factory=lambda: default_faults(3))
    brokers: int = 3  # Kafka nodes of the private instance
    requests: int = 100  # per fault, all in flight when it is injected
    sockets: int = 10
    max_tokens: int = 240
    itl_ms: float = 50.0  # synthetic engine: 240 tokens take ~12 s
    kafka_down_s: float = 10.0
    stall_s: float = 60.0
    # Between the leader kill and the follower kill (kafka-leader).
    leader_gap_s: float = 10.0
    # How long a combined fault keeps its server down after the kill (gateway+redis,
    # aggregator+postgres): the restarted or surviving processes work without it meanwhile.
    hold_s: float = 5.0
    # New submits during each fault: one per interval (alternating gateways), at most
    # `max_probes`, each `probe_tokens` long.
    probe_interval_s: float = 0.5
    max_probes: int = 20
    probe_tokens: int = 40
    quick: bool = False

    @classmethod
    def quick_version(cls, **overrides: Any) -> Options:
        """What `make test` runs: fewer and shorter streams, short outages (~2-3 min)."""
        quick = cls(
            faults=default_faults(1, quick=True),
            brokers=1,
            requests=30,
            sockets=6,
            max_tokens=120,
            kafka_down_s=3.0,
            stall_s=5.0,
            leader_gap_s=5.0,
            hold_s=2.0,
            max_probes=8,
            quick=True,
        )
        return replace(quick, **overrides)

    def tokens(self, fault: str) -> int:
        """max_tokens of the fault's requests."""
        return self.max_tokens * _LONG.get(fault, 1)


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


async def _wait_sessions(sessions: Sequence[Session], cond: Any, within_s: float) -> bool:
    end = time.monotonic() + within_s
    for s in sessions:
        if not await s.wait(lambda s=s: cond(s), max(0.0, end - time.monotonic())):
            return False
    return True


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _process_port(stack: Stack, name: str) -> int | None:
    """The port a stack process listens on (gRPC, HTTP or /metrics), if any."""
    argv = stack.commands[name]
    if argv[0] in ("gateway", "model-server"):
        return int(argv[argv.index("--port") + 1])
    return stack.metrics_ports.get(name)


class DuplicateBills:
    """The aggregator's duplicate-bill counter summed over its incarnations (a kill -9 resets
    it): read before each kill and at the end of each phase."""

    def __init__(self, stack: Stack) -> None:
        self.port = stack.metrics_ports["aggregator"]
        self.banked = 0.0  # counted by incarnations that are gone
        self.last = 0.0  # what the current incarnation said last

    def _read(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            scrape = promstats.parse(r.read().decode())
        return promstats.total(scrape, DUPLICATE_BILLS) or 0.0

    async def sample(self) -> float:
        """The total so far (the current incarnation's last value if it does not answer)."""
        with contextlib.suppress(OSError):
            self.last = await asyncio.to_thread(self._read)
        return self.banked + self.last

    async def before_kill(self) -> None:
        await self.sample()
        self.banked += self.last
        self.last = 0.0


@dataclass
class Phase:
    """What one fault phase observed, for the verdict."""

    fault: str
    stack: Stack
    opts: Options
    sessions: list[Session]
    probe_sessions: list[Session]
    probes: list[check.Probe] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)  # what contradicts the fault ('': fine)
    marks: dict[str, float] = field(default_factory=dict)  # monotonic times of fault steps
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step
    extra: dict[str, Any] = field(default_factory=dict)  # facts for the record

    def streams(self) -> dict[str, check.ClientStream]:
        return {rid: st for s in self.sessions for rid, st in s.streams.items()}

    def step(self, name: str) -> None:
        now = time.monotonic()
        last = max(self.marks.values(), default=now)
        self.steps[f"{name}_s"] = round(now - last, 2)
        self.marks[name] = now


async def _kill(phase: Phase, name: str, bills: DuplicateBills) -> None:
    """kill -9 of a stack process with the evidence that it died, then its restart."""
    stack = phase.stack
    proc = stack.procs[name]
    if name == "aggregator":
        await bills.before_kill()
    await asyncio.to_thread(stack.kill, name)
    port = _process_port(stack, name)
    phase.evidence.append(
        check.process_killed(
            proc.returncode,
            _pid_alive(proc.pid),
            _port_open(port) if port is not None else None,
        )
    )
    stack.start(name)  # what a supervisor does; nothing else is restarted by anyone


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _redis_info() -> dict[str, Any]:
    r = aioredis.from_url(config.redis_url(), socket_timeout=5, socket_connect_timeout=5)
    try:
        info = await r.info("server")
    finally:
        await r.aclose()
    return {"run_id": info["run_id"], "uptime_s": int(info["uptime_in_seconds"])}


def _server_ids(name: str) -> dict[str, Any]:
    (st,) = [s for s in infra.status() if s.name == name]
    return {"pid": st.pid}


async def _server_state(name: str) -> dict[str, Any]:
    """What changes when a server restarts: Redis' run id and uptime, else its pid."""
    return await _redis_info() if name == "redis" else _server_ids(name)


async def _restart(phase: Phase, name: str) -> None:
    """Stop and start an infrastructure server, proving it restarted."""
    before = await _server_state(name)
    await asyncio.to_thread(infra.stop_component, name)
    phase.step("stop")
    await asyncio.to_thread(infra.start_component, name)
    phase.step("start")
    phase.evidence.append(check.server_restarted(before, await _server_state(name)))


def _broker_pids() -> dict[int, int | None]:
    return {n.node_id: n.pid for n in infra.kafka_nodes()}


async def _kafka_outage(phase: Phase, kill: bool) -> None:
    """Every broker stopped (or killed), started again after `kafka_down_s`."""
    before = _broker_pids()
    await asyncio.to_thread(infra.stop_component, "kafka", kill)
    phase.step("stop")
    open_ports = [n.address for n in infra.kafka_nodes() if _port_open(_port_of(n.address))]
    phase.evidence.append(f"broker ports still open: {open_ports}" if open_ports else "")
    await asyncio.sleep(phase.opts.kafka_down_s)
    phase.step("down")
    await asyncio.to_thread(infra.start_component, "kafka")
    phase.step("back")  # every broker answers a Metadata request again
    after = _broker_pids()
    phase.evidence += [
        check.server_restarted({"pid": before[i]}, {"pid": after[i]}) for i in before
    ]


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


async def _tokens_partitions(stack: Stack) -> dict[int, tuple[int, list[int]]]:
    """Partition -> (leader, in-sync replicas) of the stack's tokens topic."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka_bootstrap())
    await admin.start()
    try:
        (topic,) = await admin.describe_topics([stack.tokens_topic])
    finally:
        await admin.close()
    return {int(p["partition"]): (int(p["leader"]), list(p["isr"])) for p in topic["partitions"]}


async def _kill_broker(phase: Phase, node_id: int) -> None:
    (node,) = [n for n in infra.kafka_nodes() if n.node_id == node_id]
    assert node.pid is not None, f"broker {node_id} is not running"
    await asyncio.to_thread(infra.stop_kafka_node, node_id, True)
    phase.evidence.append(
        check.process_killed(None, _pid_alive(node.pid), _port_open(_port_of(node.address)))
    )


async def _restart_brokers(phase: Phase, node_ids: Sequence[int]) -> None:
    await asyncio.gather(*(asyncio.to_thread(infra.start_kafka_node, i) for i in node_ids))
    phase.step("back")


async def _kafka_leader(phase: Phase) -> None:
    """kill -9 of the leader of tokens partition 0; `leader_gap_s` later of a follower of it
    (now 1 of 3 brokers: no quorum, and fewer in-sync replicas than min.insync.replicas);
    both started again after `kafka_down_s`."""
    opts = phase.opts
    leader, _ = (await _tokens_partitions(phase.stack))[0]
    await _kill_broker(phase, leader)
    phase.step("leader_killed")
    await asyncio.sleep(opts.leader_gap_s)
    new_leader, isr = (await _tokens_partitions(phase.stack))[0]
    follower = next(i for i in isr if i not in (leader, new_leader))
    phase.extra["brokers"] = {"leader": leader, "new_leader": new_leader, "follower": follower}
    await _kill_broker(phase, follower)
    phase.step("follower_killed")
    await asyncio.sleep(opts.kafka_down_s)
    phase.step("down")
    await _restart_brokers(phase, [leader, follower])


async def _worker_and_leader(phase: Phase, bills: DuplicateBills) -> None:
    """kill -9 of a worker right after the tokens partition 0 leader's; the broker comes back
    after `kafka_down_s`."""
    leader, _ = (await _tokens_partitions(phase.stack))[0]
    await _kill_broker(phase, leader)
    await _kill(phase, "worker-0", bills)
    phase.step("killed")
    await asyncio.sleep(phase.opts.kafka_down_s)
    phase.step("down")
    await _restart_brokers(phase, [leader])


async def _kill_during_restart(phase: Phase, name: str, server: str, bills: DuplicateBills) -> None:
    """kill -9 of a stack process (restarted at once) while an infrastructure server is
    down; the server comes back afterwards."""
    before = await _server_state(server)
    await asyncio.to_thread(infra.stop_component, server)
    phase.step("stop")
    await _kill(phase, name, bills)
    phase.step("killed")
    await asyncio.sleep(phase.opts.hold_s)
    phase.step("held")
    await asyncio.to_thread(infra.start_component, server)
    phase.step("start")
    phase.evidence.append(check.server_restarted(before, await _server_state(server)))


async def _stall(phase: Phase) -> None:
    session = phase.sessions[0]
    stalled_from = time.monotonic()
    await session.stall(phase.opts.stall_s)
    phase.step("stall")
    # Proof: while it stood still, the session took in nothing (but the one frame its read
    # under way at the start returned) although it had streams open.
    stalled_until = stalled_from + phase.opts.stall_s
    received = [
        t
        for st in session.streams.values()
        for t in st.arrivals()
        if stalled_from < t < stalled_until
    ]
    open_after = [st for st in session.streams.values() if not st.finished_by(stalled_from)]
    if not open_after:
        phase.evidence.append("the stalled session had no open stream")
    elif len(received) > 1:
        phase.evidence.append(f"the stalled session took in {len(received)} frames")
    else:
        phase.evidence.append("")


def _process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (T: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[-1].split()[0]


async def _zombie(phase: Phase, in_flight: list[check.ClientStream]) -> None:
    """SIGSTOP of a worker until the group has moved its requests (every stream in flight
    flowed again after the session timeout, which only another worker can have done), then
    SIGCONT: it runs on where it stopped, with buffered model output to produce."""
    proc = phase.stack.procs[ZOMBIE]
    session_s = int(phase.stack.env.get("LLMSTREAM_WORKER_SESSION_TIMEOUT_MS", "10000")) / 1000
    phase.extra["frozen_at_ms"] = int(time.time() * 1000)
    os.kill(proc.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    phase.evidence.append(await _state_becomes(proc.pid, "T"))
    after = frozen_at + session_s
    if not await _wait_sessions(phase.sessions, lambda _: _flowing(in_flight, after), 120):
        phase.evidence.append("the frozen worker's requests were not taken over in 120 s")
    phase.step("taken_over")
    os.kill(proc.pid, signal.SIGCONT)
    phase.evidence.append(await _state_becomes(proc.pid, "not T"))
    phase.extra["frozen_s"] = round(time.monotonic() - frozen_at, 2)


async def _state_becomes(pid: int, want: str, within_s: float = 5.0) -> str:
    """'' once the process is in state `want` ("T": stopped; "not T"), else what it is in
    (a signal takes effect asynchronously)."""
    end = time.monotonic() + within_s
    while True:
        state = _process_state(pid)
        if (state == "T") == (want == "T") or time.monotonic() > end:
            return "" if (state == "T") == (want == "T") else f"state {state}, not {want}"
        await asyncio.sleep(0.01)


def _assigned_at_ms(stack: Stack, name: str) -> list[int]:
    """Wall-clock ms of the `partitions assigned` lines of a worker's log."""
    out = []
    for line in (stack.tmp / f"{name}.log").read_text(errors="replace").splitlines():
        if '"partitions assigned"' in line:
            ts = json.loads(line)["ts"]
            out.append(int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000))
    return out


def _zombie_out_ms(stack: Stack, frozen_at_ms: int) -> tuple[int, int | None]:
    """When the zombie was out of the group: from another worker's first assignment after the
    freeze to the zombie's own next one (None: none yet)."""
    others = [
        t
        for name in stack.procs
        if name.startswith("worker-") and name != ZOMBIE
        for t in _assigned_at_ms(stack, name)
        if t > frozen_at_ms
    ]
    back = [t for t in _assigned_at_ms(stack, ZOMBIE) if t > frozen_at_ms]
    return min(others, default=frozen_at_ms), min(back, default=None)


async def _inject(phase: Phase, bills: DuplicateBills, in_flight: list[check.ClientStream]) -> None:
    fault = phase.fault
    if fault in _KILLS:
        await _kill(phase, _KILLS[fault], bills)
    elif fault in ("kafka", "kafka-kill"):
        await _kafka_outage(phase, kill=fault == "kafka-kill")
    elif fault == "kafka-leader":
        await _kafka_leader(phase)
    elif fault == "worker+leader":
        await _worker_and_leader(phase, bills)
    elif fault == "gateway+redis":
        await _kill_during_restart(phase, "gateway", "redis", bills)
    elif fault == "aggregator+postgres":
        await _kill_during_restart(phase, "aggregator", "postgres", bills)
    elif fault in ("redis", "postgres"):
        await _restart(phase, fault)
    elif fault == "stall":
        await _stall(phase)
    elif fault == "zombie":
        await _zombie(phase, in_flight)
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    phase.step("injected")


def _flowing(streams: Sequence[check.ClientStream], since: float) -> bool:
    """Every stream has ended or received a frame after `since`."""
    return all(s.dones or any(t > since for t in s.arrivals()) for s in streams)


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
        if injected.is_set() and _flowing(in_flight, phase.marks["injected"]):
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
    result = check.FaultResult(fault, requests=opts.requests, goal=_GOALS.get(fault, ""))
    tokens = opts.tokens(fault)
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
    every = [*phase.sessions, *phase.probe_sessions]
    bills_before = await bills.sample()
    try:
        await asyncio.gather(*(s.start() for s in every))
        for i in range(opts.requests):
            session = phase.sessions[i % len(phase.sessions)]
            await session.submit(f"q{i}", prompt(i), tokens, _SAMPLED.get(fault, 0.0))
        if not await _wait_sessions(phase.sessions, lambda s: s.unanswered() == 0, 60):
            raise RuntimeError(f"{fault}: submits not answered within 60 s")
        refused = [f for s in phase.sessions for f in s.refused.values()]
        if refused:
            raise RuntimeError(f"{fault}: {len(refused)} submits refused, e.g. {refused[0]}")
        streaming = await _wait_sessions(
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
            await _inject(phase, bills, in_flight)
        except BaseException:
            prober.cancel()
            raise
        finally:
            injected.set()
        result.outage_s = phase.marks["injected"] - fault_at
        budget = tokens * opts.itl_ms / 1000 + 120
        await prober
        if not await _wait_sessions(
            every, lambda s: not s.unfinished() and not s.unanswered(), budget
        ):
            result.notes.append(f"requests unfinished {budget:.0f} s after the fault")
        _measure(phase, result, streams)
    finally:
        await asyncio.gather(*(s.close() for s in every))
    result.dead_processes = sorted(n for n, p in stack.procs.items() if p.poll() is not None)
    for name in result.dead_processes:  # so that the next phase runs on a whole stack
        stack.start(name)
    _probe_outcomes(phase)
    result.extra.update(phase.extra, steps=phase.steps)
    await _judge(phase, tenant_id, expected, result, bills, bills_before)
    evidence = [e for e in phase.evidence if e]
    result.proof = "; ".join(evidence) if evidence or phase.evidence else "no evidence taken"
    result.seconds = time.monotonic() - started
    return result


def _measure(
    phase: Phase, result: check.FaultResult, streams: dict[str, check.ClientStream]
) -> None:
    """Silences of the in-flight streams, and what the fault's goal bounds."""
    fault_at = phase.marks["fault"]
    result.stall = check.spread(check.longest_silences(streams.values(), fault_at))
    if phase.fault == "gateway":
        # Reconnect -> first frame of each stream that was open on the dead socket.
        waits: list[float | None] = []
        for s in phase.sessions:
            later = [t for t in s.reconnected_at if t > fault_at]
            if later:
                waits += check.first_frames_after(s.streams.values(), later[0])
        result.goal_measure = check.spread(waits)
    if "back" in phase.marks:  # brokers answer again -> each stream's next frame
        back = check.spread(check.first_frames_after(streams.values(), phase.marks["back"]))
        result.extra["broker_back_to_flowing_s"] = asdict(back)
        if phase.fault in ("kafka", "kafka-kill"):
            result.goal_measure = back
    if phase.fault == "kafka-leader":
        leader = check.longest_silences(
            streams.values(), fault_at, until=phase.marks["follower_killed"]
        )
        result.goal_measure = check.spread(leader)
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
        ledger, daily = await _ledger(stack.database_url, tenant_id)
        if sum(r.rows for r in ledger.values()) >= terminal or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    tokens = opts.tokens(phase.fault)
    truths = {}
    if phase.fault == "zombie":
        zombie = stack.commands[ZOMBIE][stack.commands[ZOMBIE].index("--id") + 1]
        out_ms = _zombie_out_ms(stack, phase.extra["frozen_at_ms"])
        result.extra["zombie_out_ms"] = out_ms
        truths = check.owner_truth((e for e in events if e.request_id in wanted), zombie, out_ms)
        result.extra["zombie_late_events"] = sum(t.late_events for t in truths.values())
        result.extra["taken_over"] = sum(t.taken_over for t in truths.values())
    verdicts = []
    for rid, cs in streams.items():
        truth = truths.get(rid)
        text = truth.text if truth is not None else expected.get((cs.prompt, tokens), "")
        verdict = check.judge_request(cs, text, states.get(rid), ledger.get(rid))
        if truth is not None:
            check.judge_owner(verdict, states.get(rid), truth)
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
        billing = await _tenant_billing(tenant_id, ledger, daily)
        billing.duplicate_bill_counter = int(await bills.sample() - bills_before)
        findings = check.judge_tenant(billing)
        if not (findings.mismatches or findings.double_bills) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
        ledger, daily = await _ledger(stack.database_url, tenant_id)
    result.extra["billing"] = asdict(billing)
    check.tally(result, verdicts, findings, probes)


async def _ledger(
    database_url: str, tenant_id: str
) -> tuple[dict[str, check.LedgerRow], tuple[int, int]]:
    """The tenant's ledger rows by request, and its usage_daily (requests, tokens)."""
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=10) as conn:
        cur = await conn.execute(
            "SELECT request_id, count(*), sum(prompt_tokens), sum(completion_tokens)"
            " FROM usage_ledger WHERE tenant_id = %s GROUP BY request_id",
            (tenant_id,),
        )
        ledger = dict(check.ledger_by_request(await cur.fetchall()))
        cur = await conn.execute(
            "SELECT coalesce(sum(requests), 0), coalesce(sum(prompt_tokens + completion_tokens), 0)"
            " FROM usage_daily WHERE tenant_id = %s",
            (tenant_id,),
        )
        row = await cur.fetchone()
        assert row is not None
    return ledger, (int(row[0]), int(row[1]))


async def _tenant_billing(
    tenant_id: str, ledger: dict[str, check.LedgerRow], daily: tuple[int, int]
) -> check.TenantBilling:
    now_ms = int(time.time() * 1000)
    rc = aioredis.from_url(config.redis_url(), socket_timeout=5, socket_connect_timeout=5)
    try:
        day = int(await rc.get(quota_keys.tokens_day(tenant_id, now_ms)) or 0)
        month = int(await rc.get(quota_keys.tokens_month(tenant_id, now_ms)) or 0)
        settled = int(await rc.scard(quota_keys.settled(tenant_id, now_ms)))
        open_streams = int(await rc.zcard(quota_keys.streams(tenant_id)))
    finally:
        await rc.aclose()
    return check.TenantBilling(
        ledger_rows=sum(r.rows for r in ledger.values()),
        ledger_tokens=sum(r.prompt_tokens + r.completion_tokens for r in ledger.values()),
        daily_requests=daily[0],
        daily_tokens=daily[1],
        redis_day=day,
        redis_month=month,
        settled=settled,
        open_streams=open_streams,
        duplicate_bill_counter=0,
    )


async def run(opts: Options, workdir: Path) -> list[check.FaultResult]:
    """Every fault of `opts`, one after another, on one private stack. Blocks ~1 min + the
    phases (about 20-30 s each, plus the stall and broker outage)."""
    unknown = [f for f in opts.faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    if opts.brokers < 3 and any(f in CLUSTER_FAULTS for f in opts.faults):
        raise ValueError(f"{', '.join(CLUSTER_FAULTS)} need --brokers 3")
    lengths = sorted({opts.tokens(f) for f in opts.faults})
    wanted = [(prompt(i), n) for n in lengths for i in range(opts.requests)]
    wanted += [(probe_prompt(i), opts.probe_tokens) for i in range(opts.max_probes)]
    expected = await reference_texts(wanted)
    results: list[check.FaultResult] = []
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
            bills = DuplicateBills(stack)
            for fault in opts.faults:
                print(f"== {fault}: {FAULTS[fault]}", file=sys.stderr, flush=True)
                result = await run_fault(stack, fault, opts, expected, bills)
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
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def options_from(args: argparse.Namespace) -> Options:
    overrides: dict[str, Any] = {}
    for name in ("brokers", "requests", "stall_s", "kafka_down_s", "max_tokens"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    opts = Options.quick_version(**overrides) if args.quick else replace(Options(), **overrides)
    faults = [f for f in args.faults.split(",") if f] if args.faults else None
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
    try:
        results = asyncio.run(run(opts, workdir))
    except infra.InfraError as exc:  # the private instance could not start: one line
        print(f"llmstream chaos: {exc}", file=sys.stderr)
        return 1
    data = record(opts, results, stamp, time.time() - started)
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
