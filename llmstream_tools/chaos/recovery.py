"""Recovery time (pure: no I/O; unit-tested): how long in-flight streams were silent after a
fault, from the arrival times of their frames, as p50/p99/max spreads, and the issue-18 recovery
goals they are judged against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # check imports this module for its table
    from llmstream_tools.chaos.check import ClientStream


@dataclass
class Spread:
    n: int = 0
    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    never: int = 0  # streams that never received anything again

    def text(self) -> str:
        if self.never:
            return f"never ({self.never})"
        if not self.n:
            return "-"
        return f"{self.p50:.1f} / {self.p99:.1f} / {self.max:.1f}"


def spread(values: Sequence[float | None]) -> Spread:
    """Nearest-rank percentiles of the values; None (never) counted apart."""
    known = sorted(v for v in values if v is not None)
    never = len(values) - len(known)
    if not known:
        return Spread(never=never)

    def rank(q: float) -> float:
        return known[max(0, math.ceil(q * len(known)) - 1)]

    return Spread(len(known), round(rank(0.5), 3), round(rank(0.99), 3), known[-1], never)


def longest_silences(
    streams: Iterable[ClientStream], fault_at: float, until: float | None = None
) -> list[float | None]:
    """Per stream in flight at `fault_at`: the longest time it received nothing, from its last
    frame before the fault to its `done`, or only up to `until` (a silence still going on then
    counts up to it). None: it never received anything again (without `until`)."""
    out: list[float | None] = []
    for s in streams:
        if s.finished_by(fault_at):
            continue
        times = s.arrivals()
        prev = max([s.submitted_at, *[t for t in times if t <= fault_at]])
        after = [t for t in times if t > fault_at and (until is None or t <= until)]
        if until is not None and not s.finished_by(until):
            after.append(until)
        if not after:
            out.append(None)
            continue
        gaps = [b - a for a, b in zip([prev, *after], after, strict=False)]
        out.append(round(max(gaps), 3))
    return out


def first_frames_after(streams: Iterable[ClientStream], at: float) -> list[float | None]:
    """Per stream not finished at `at`: how long until its next frame (None: never)."""
    out: list[float | None] = []
    for s in streams:
        if s.finished_by(at):
            continue
        after = [t for t in s.arrivals() if t > at]
        out.append(round(after[0] - at, 3) if after else None)
    return out


@dataclass(frozen=True)
class Goal:
    """An issue-18 recovery goal: what is measured and the bound on its largest value."""

    what: str
    limit_s: float


GOALS: dict[str, Goal] = {
    "worker kill -9": Goal("longest silence of an in-flight stream", 2.0),
    "gateway kill -9": Goal("reconnect -> first frame of each resumed stream", 1.0),
    "broker back": Goal("broker answers again -> each stream's next frame", 2.0),
    "leader kill -9": Goal("longest silence of an in-flight stream (3 brokers)", 5.0),
}


def goal_verdict(goal: str, measured: Spread) -> str:
    limit = GOALS[goal].limit_s
    if measured.never or not measured.n:
        return "MISS"
    return "PASS" if measured.max <= limit else "MISS"
