"""Memory and file descriptors of every process over a soak (`llmstream chaos --soak`), and the
verdict on their growth.

Samples come from /proc: `VmRSS` of /proc/<pid>/status and the entries of /proc/<pid>/fd, per
process of the stack (services: judged) and of the private infrastructure (brokers, Redis,
PostgreSQL's postmaster: reported, not judged — a JVM's heap grows up to its -Xmx, which is the
bound). Every minute a sample is taken for the series; after every phase, once its requests
have ended and its sockets are closed, a **quiet** sample, so that two quiet samples hold the
same kind of state (no request in flight, no client connected) and can be compared.

The growth verdict (pure, unit-tested) compares quiet samples of one incarnation (a pid: a
process killed by a fault starts again with a new one): its **warm** sample is its first quiet
one after the soak's first fault phase (caches, pools and buffers have been filled and a
reconnect has happened once; or its first quiet one, if it started later), its **end** sample
its last. It grew without bound if

- RSS end > warm + max(`rss_fraction` x warm, `rss_slack_mib`), or
- open fds end > warm + `fd_slack`.

An incarnation with fewer than two quiet samples from its warm one on is not judged (said so).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVICE = "service"
INFRA = "infra"


@dataclass(frozen=True)
class Sample:
    at_s: float  # since the soak started
    label: str  # "start", "minute", "after <phase>"
    quiet: bool  # taken between phases (no request in flight, no socket open)
    name: str
    kind: str  # SERVICE or INFRA
    pid: int
    rss_kib: int
    fds: int


def read_proc(pid: int, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(RSS in KiB, open file descriptors) of a live process, None if it is gone."""
    try:
        status = (proc / str(pid) / "status").read_text()
        fds = len(os.listdir(proc / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]), fds
    return None  # a zombie process has no VmRSS


def take(
    processes: Mapping[str, tuple[str, int]], at_s: float, label: str, quiet: bool
) -> list[Sample]:
    """One sample of each process: name -> (kind, pid)."""
    out = []
    for name, (kind, pid) in processes.items():
        read = read_proc(pid)
        if read is not None:
            out.append(Sample(at_s, label, quiet, name, kind, pid, read[0], read[1]))
    return out


@dataclass(frozen=True)
class GrowthLimits:
    rss_fraction: float = 0.25
    rss_slack_mib: float = 32.0
    fd_slack: int = 16


@dataclass
class Growth:
    """One process (all its incarnations) over the soak."""

    name: str
    kind: str
    pids: list[int] = field(default_factory=list)  # every incarnation, first first
    start: Sample | None = None  # the first sample of all
    warm: Sample | None = None  # of the judged (last judged) incarnation
    end: Sample | None = None
    max_rss_kib: int = 0
    findings: list[str] = field(default_factory=list)  # what grew
    not_judged: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.findings:
            return "GREW: " + "; ".join(self.findings)
        if self.kind != SERVICE:
            return "reported"
        if self.warm is None:
            return "not judged: " + "; ".join(self.not_judged)
        return "ok"


def _mib(kib: int) -> float:
    return kib / 1024


def judge_growth(
    samples: Iterable[Sample], warm_from_s: float, limits: GrowthLimits = GrowthLimits()
) -> list[Growth]:
    """Per process, in order of first appearance (see the module's docstring)."""
    by_name: dict[str, Growth] = {}
    quiet: dict[tuple[str, int], list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.at_s):
        g = by_name.setdefault(s.name, Growth(s.name, s.kind))
        if s.pid not in g.pids:
            g.pids.append(s.pid)
        g.start = g.start or s
        g.max_rss_kib = max(g.max_rss_kib, s.rss_kib)
        if s.quiet and s.at_s >= warm_from_s:
            quiet.setdefault((s.name, s.pid), []).append(s)
    for g in by_name.values():
        for pid in g.pids:
            series = quiet.get((g.name, pid), [])
            if len(series) < 2:
                g.not_judged.append(f"pid {pid}: {len(series)} quiet sample(s) after warm-up")
                continue
            warm, end = series[0], series[-1]
            g.warm, g.end = warm, end
            if g.kind != SERVICE:
                continue
            allowed = max(limits.rss_fraction * warm.rss_kib, limits.rss_slack_mib * 1024)
            if end.rss_kib > warm.rss_kib + allowed:
                g.findings.append(
                    f"pid {pid} RSS {_mib(warm.rss_kib):.0f} -> {_mib(end.rss_kib):.0f} MiB "
                    f"(more than {_mib(int(allowed)):.0f} MiB over its warm size)"
                )
            if end.fds > warm.fds + limits.fd_slack:
                g.findings.append(
                    f"pid {pid} fds {warm.fds} -> {end.fds} (more than {limits.fd_slack} over)"
                )
    return list(by_name.values())


def _cell(s: Sample | None) -> tuple[str, str]:
    return ("-", "-") if s is None else (f"{_mib(s.rss_kib):.0f}", str(s.fds))


GROWTH_COLUMNS = (
    "process",
    "incarnations",
    "RSS MiB start / warm / end (max)",
    "fds start / warm / end",
    "verdict",
)


def growth_table(growth: Sequence[Growth]) -> str:
    lines = [
        "| " + " | ".join(GROWTH_COLUMNS) + " |",
        "|---|---:|---:|---:|---|",
    ]
    for g in growth:
        (r0, f0), (r1, f1), (r2, f2) = _cell(g.start), _cell(g.warm), _cell(g.end)
        lines.append(
            f"| {g.name} | {len(g.pids)} | {r0} / {r1} / {r2} ({_mib(g.max_rss_kib):.0f}) "
            f"| {f0} / {f1} / {f2} | {g.verdict} |"
        )
    return "\n".join(lines)
