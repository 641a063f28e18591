"""A stack process in its own network namespace, and the link faults made on it
(`worker-link`: the link cut; `gateway-delay`: round trips to the brokers made longer).

For the phase of such a fault, `isolated()` stops the process, makes a namespace (`ip netns
add`) with a veth pair whose two addresses are a free /30 of 10.254.0.0/16 (none of the
machine's addresses or routes overlap it), starts `chaos.forward` (the service's only way to the
brokers, model servers, Redis and PostgreSQL, over the veth) and starts the process inside the
namespace (`ip netns exec`). Afterwards, also when the phase fails, the process is stopped, the
forwarder ends, the namespace is deleted (which deletes the veth pair) and the process is
started again on the host's network. Namespaces that a killed run left behind (named after
its pid) are deleted before a new one is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg.conninfo import conninfo_to_dict

from llmstream import config
from llmstream_tools.stack import Stack

if TYPE_CHECKING:  # faults dispatches to the link faults here
    from llmstream_tools.chaos.faults import Phase

log = logging.getLogger("llmstream_tools.chaos")

NAME_PREFIX = "llmstream-chaos-"
POOL = ipaddress.IPv4Network("10.254.0.0/16")
STOP_WITHIN_S = 30.0
READY_WITHIN_S = 60.0
PROBES = 5  # round trips measured per point
ASSIGNED = '"partitions assigned"'  # a worker's log line once it has partitions


class NamespaceRefused(RuntimeError):
    """The machine does not let this process make a network namespace (not root, or a
    container without CAP_NET_ADMIN / CAP_SYS_ADMIN)."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def free_subnet(used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /30 of POOL that overlaps none of `used` (the machine's addresses and routes)."""
    taken = list(used)
    for subnet in POOL.subnets(new_prefix=30):
        if not any(subnet.overlaps(n) for n in taken):
            return subnet
    raise NamespaceRefused(f"no free /30 left in {POOL}")


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = []
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        words = line.split()
        out.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        dest = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if dest not in ("default", "broadcast", "local", "unreachable"):
                out.append(ipaddress.IPv4Network(dest, strict=False))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces of chaos runs whose process is gone (a kill -9 skips cleanup)."""
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NAME_PREFIX):
            continue
        pid = name.removeprefix(NAME_PREFIX).split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _ip("netns", "del", name)
            removed.append(name)
    return removed


@dataclass
class Namespace:
    name: str
    host_dev: str  # the host's end of the veth
    inner_dev: str
    host_ip: str
    inner_ip: str

    @classmethod
    def create(cls) -> Namespace:
        pid = os.getpid()
        try:
            remove_stale()
            names = {line.split()[0] for line in _ip("netns", "list").splitlines() if line.split()}
            index = next(i for i in range(100) if f"{NAME_PREFIX}{pid}-{i}" not in names)
            subnet = free_subnet(_used_networks())
            host_ip, inner_ip = (str(a) for a in subnet.hosts())
            ns = cls(f"{NAME_PREFIX}{pid}-{index}", f"lc{pid}-{index}h", f"lc{pid}-{index}n",
                     host_ip, inner_ip)  # fmt: skip
            _ip("netns", "add", ns.name)
        except OSError as exc:
            raise NamespaceRefused(f"cannot make a network namespace: {exc}") from exc
        try:
            _ip("link", "add", ns.host_dev, "type", "veth", "peer", "name", ns.inner_dev)
            _ip("link", "set", ns.inner_dev, "netns", ns.name)
            _ip("addr", "add", f"{host_ip}/30", "dev", ns.host_dev)
            _ip("link", "set", ns.host_dev, "up")
            _ip("-n", ns.name, "addr", "add", f"{inner_ip}/30", "dev", ns.inner_dev)
            _ip("-n", ns.name, "link", "set", ns.inner_dev, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def set_link(self, up: bool) -> None:
        _ip("link", "set", self.host_dev, "up" if up else "down")

    def link_state(self) -> str:
        """The host end's operational state (`UP`, `DOWN`, ...)."""
        words = _ip("-o", "link", "show", "dev", self.host_dev).split()
        return words[words.index("state") + 1]

    def delete(self) -> None:
        """The namespace, its end of the veth with it, and the host's end if still there."""
        with contextlib.suppress(OSError):
            for pid in _ip("netns", "pids", self.name).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError):
            _ip("netns", "del", self.name)
        with contextlib.suppress(OSError):
            _ip("link", "del", self.host_dev)


class ForwarderProcess:
    """`chaos.forward` for one namespace, commanded over its stdin."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, ns: Namespace, out: list[str], inbound: list[int], log_file: Path
    ) -> ForwarderProcess:
        err = await asyncio.to_thread(open, log_file, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llmstream_tools.chaos.forward", "--netns", ns.name,
                "--host-ip", ns.host_ip, "--out", *out, "--inbound", *map(str, inbound),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        finally:
            err.close()
        fwd = cls(proc)
        try:
            ready = await fwd._answer()
            if not ready.get("ready"):
                raise RuntimeError(f"forwarder: {ready}")
        except BaseException:
            await fwd.close()
            raise
        return fwd

    async def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 15)
        if not line:
            raise RuntimeError(f"the forwarder exited ({await self.proc.wait()}); see its log")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def command(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._answer()

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: it stops
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass
class Link:
    ns: Namespace
    forwarder: ForwarderProcess
    service: str
    broker_ports: list[int]
    probes: list[dict[str, Any]] = field(default_factory=list)  # the record of every probe

    async def probe(self, label: str) -> float | None:
        """A broker round trip (ms) from inside the namespace over the veth, or None."""
        answer = await self.forwarder.command(f"probe {self.broker_ports[0]}")
        self.probes.append({"at": label, **answer})
        return float(answer["ok"]) if "ok" in answer else None

    async def round_trips_ms(self, label: str) -> list[float] | None:
        """PROBES round trips (None if any failed)."""
        values = [await self.probe(label) for _ in range(PROBES)]
        known = [v for v in values if v is not None]
        return known if len(known) == len(values) else None


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _routes(stack: Stack) -> tuple[list[str], list[int]]:
    """Every server the stack's processes dial (brokers marked `delay`) and its broker ports."""
    brokers = [_port(a) for a in config.kafka_bootstrap().split(",") if a.strip()]
    others = [_port(a) for a in stack.model_servers]
    others.append(urllib.parse.urlsplit(config.redis_url()).port or 6379)
    others.append(int(conninfo_to_dict(stack.database_url).get("port") or 5432))
    return [f"{p}:delay" for p in brokers] + [str(p) for p in sorted(set(others))], brokers


def _listen_ports(argv: list[str]) -> list[int]:
    """Ports a stack process listens on: --port and every non-zero --metrics-port."""
    ports = [int(argv[i + 1]) for i, a in enumerate(argv) if a in ("--port", "--metrics-port")]
    return sorted({p for p in ports if p})


def _start_inside(stack: Stack, name: str, ns: Namespace) -> subprocess.Popen[bytes]:
    """Stack.start, inside the namespace (`ip netns exec` execs the process: same pid)."""
    env = {**stack.env, config.PREFIX + "PRINCIPAL": stack.commands[name][0]}
    with open(stack.tmp / f"{name}.log", "ab") as out:
        stack.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-m", "llmstream_tools.cli",
             *stack.commands[name]],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return stack.procs[name]


def _stop(stack: Stack, name: str) -> None:
    proc = stack.procs[name]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _log_lines(stack: Stack, name: str, text: str) -> int:
    path = stack.tmp / f"{name}.log"
    return sum(text in line for line in path.read_text(errors="replace").splitlines())


async def _until_serving(stack: Stack, name: str, assigned_before: int) -> None:
    """A gateway answers /readyz (through the forwarder when it is in a namespace); a worker
    logged a new assignment."""
    argv = stack.commands[name]
    end = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < end:
        if stack.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited during start-up; see {stack.tmp}/{name}.log")
        if argv[0] == "gateway":
            # Its public port: /readyz is not served on its metrics port.
            url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}/readyz"
            with contextlib.suppress(OSError):
                await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)
                return
        elif await asyncio.to_thread(_log_lines, stack, name, ASSIGNED) > assigned_before:
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"{name} not serving within {READY_WITHIN_S:.0f} s after its start")


@contextlib.asynccontextmanager
async def isolated(stack: Stack, name: str) -> AsyncIterator[Link]:
    """Process `name` of the stack runs in its own namespace for the block."""
    ns = await asyncio.to_thread(Namespace.create)
    try:
        await asyncio.to_thread(_stop, stack, name)
        out, brokers = _routes(stack)
        fwd = await ForwarderProcess.start(
            ns, out, _listen_ports(stack.commands[name]), stack.tmp / f"forward-{name}.log"
        )
        try:
            assigned = await asyncio.to_thread(_log_lines, stack, name, ASSIGNED)
            _start_inside(stack, name, ns)
            await _until_serving(stack, name, assigned)
            log.info("isolated", extra={"fields": {"process": name, "netns": ns.name}})
            yield Link(ns, fwd, name, brokers)
        finally:
            await asyncio.to_thread(_stop, stack, name)
            await fwd.close()
    finally:
        await asyncio.to_thread(ns.delete)
        # Back on the host's network, as it was, and serving before the next phase begins.
        assigned = await asyncio.to_thread(_log_lines, stack, name, ASSIGNED)
        stack.start(name)
        await _until_serving(stack, name, assigned)


# ---------------------------------------------------------------------------- the faults


async def cut_link(phase: Phase, link: Link) -> None:
    """The namespace's link down for `link_down_s` (`ip link set <host end> down`), then up.
    Proof: a broker round trip over the link answered before, failed while it was down
    (the interface in state DOWN), and answered again after."""
    before = await link.probe("before")
    await asyncio.to_thread(link.ns.set_link, False)
    phase.step("cut")
    state = await asyncio.to_thread(link.ns.link_state)
    during = await link.probe("down")
    await asyncio.sleep(max(0.0, phase.opts.link_down_s - (time.monotonic() - phase.marks["cut"])))
    await asyncio.to_thread(link.ns.set_link, True)
    phase.step("restored")
    after = None
    end = time.monotonic() + 10
    while after is None and time.monotonic() < end:  # the carrier takes a moment
        after = await link.probe("up")
    phase.extra["link"] = {"netns": link.ns.name, "state_while_cut": state, "probes": link.probes}
    if before is None:
        phase.evidence.append("a broker round trip failed before the cut")
    elif state != "DOWN":
        phase.evidence.append(f"the link was {state}, not DOWN, while cut")
    elif during is not None:
        phase.evidence.append(f"a broker round trip crossed the cut link ({during} ms)")
    elif after is None:
        phase.evidence.append("no broker round trip over the link within 10 s of restoring it")
    else:
        phase.evidence.append("")


async def delay_link(phase: Phase, link: Link) -> None:
    """`link_delay_ms` more on every round trip between the service and the brokers for
    `link_delay_s`. Proof: every broker round trip through the link answered, and the fastest
    one while delayed took at least 90% of the delay longer than the fastest one without
    (before or after: a probe right at the fault meets the machine busiest, and any load only
    adds to a round trip, while the delay is a floor under each)."""
    opts = phase.opts
    before = await link.round_trips_ms("before")
    await link.forwarder.command(f"delay {opts.link_delay_ms}")
    phase.step("delayed")
    during = await link.round_trips_ms("delayed")
    await asyncio.sleep(max(0.0, opts.link_delay_s - (time.monotonic() - phase.marks["delayed"])))
    await link.forwarder.command("delay 0")
    phase.step("restored")
    after = await link.round_trips_ms("after")
    added = None
    if before is not None and during is not None and after is not None:
        added = round(min(during) - min(before + after), 1)

    def median(values: list[float] | None) -> float | None:
        return None if values is None else statistics.median(values)

    phase.extra["link"] = {
        "netns": link.ns.name,
        "round_trip_ms_median": {"before": median(before), "delayed": median(during),
                                 "after": median(after)},
        "added_ms": added,
        "probes": link.probes,
    }  # fmt: skip
    if added is None:
        phase.evidence.append(f"a broker round trip failed: {link.probes}")
    elif added < 0.9 * opts.link_delay_ms:
        phase.evidence.append(f"round trips grew only {added} ms, not {opts.link_delay_ms:g}")
    else:
        phase.evidence.append("")
