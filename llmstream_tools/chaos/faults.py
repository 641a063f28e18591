"""Injecting each fault into a running stack, with evidence that it took effect (a pid gone,
a port closed, a server's run id or pid changed), and the duplicate-bill counter read across
aggregator restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from llmstream import config, kafka
from llmstream_tools import infra, promstats
from llmstream_tools.chaos import check, netns
from llmstream_tools.chaos.client import Session
from llmstream_tools.chaos.options import DUPLICATE_BILLS, FAULTS, KILLS, ZOMBIE, Options
from llmstream_tools.stack import Stack

log = logging.getLogger("llmstream_tools.chaos")


async def wait_sessions(sessions: Sequence[Session], cond: Any, within_s: float) -> bool:
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
    link: netns.Link | None = None  # the link faults' namespace (chaos.netns.isolated)

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

    conn = kafka.Connection.from_env(config.ADMIN)
    admin = AIOKafkaAdminClient(**conn.client_kwargs("llmstream-chaos"))
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
    if not await wait_sessions(phase.sessions, lambda _: flowing(in_flight, after), 120):
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


def zombie_out_ms(stack: Stack, frozen_at_ms: int) -> tuple[int, int | None]:
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


async def inject(phase: Phase, bills: DuplicateBills, in_flight: list[check.ClientStream]) -> None:
    fault = phase.fault
    if fault in KILLS:
        await _kill(phase, KILLS[fault], bills)
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
    elif fault == "worker-link":
        assert phase.link is not None, "the runner isolates the worker first"
        await netns.cut_link(phase, phase.link)
    elif fault == "gateway-delay":
        assert phase.link is not None, "the runner isolates the gateway first"
        await netns.delay_link(phase, phase.link)
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    phase.step("injected")


def flowing(streams: Sequence[check.ClientStream], since: float) -> bool:
    """Every stream has ended or received a frame after `since`."""
    return all(s.dones or any(t > since for t in s.arrivals()) for s in streams)
