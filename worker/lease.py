"""Whether this worker may still produce for the requests of its partitions.

A worker that stood still (SIGSTOP, a long GC or VM pause, an event loop blocked) for about its
group session timeout may have been dropped from the group: its partitions may already be
another worker's, who continues its requests. On resume it would otherwise produce at once —
buffered model output, coalesced deltas — before its heartbeat learns that it is out. Events it
writes then are fenced by the readers (`Event.fence`, docs/events.md), but it should not write
them at all: every produce first asks the lease.

- `Lease` (pure): the watchdog's beat (`tick`, every `TICK_S`) and a check before each produce
  (`valid`) notice a standstill of `suspect_after_s` or more; the check notices it even before
  the watchdog runs again, so not one event leaves after the resume. The lease is then suspended until the
  group confirms this worker (`confirm`: a commit with its generation succeeded, or a new
  assignment) or the partitions are revoked (their runs are abandoned while they wait).
- `ProduceGate`: the lease for the async shell; `wait()` returns once it is valid again.
"""

from __future__ import annotations

import asyncio
import time

TICK_S = 0.1


class Lease:
    def __init__(self, suspect_after_s: float, now: float) -> None:
        self.suspect_after_s = suspect_after_s
        self.held = True
        self._last_tick = now

    def _stood_still(self, now: float) -> bool:
        return now - self._last_tick >= self.suspect_after_s

    def tick(self, now: float) -> bool:
        """The watchdog's beat. True when it finds the lease just suspended."""
        suspended = self.held and self._stood_still(now)
        if suspended:
            self.held = False
        self._last_tick = now
        return suspended

    def valid(self, now: float) -> bool:
        if self.held and self._stood_still(now):
            self.held = False
        return self.held

    def confirm(self, now: float) -> None:
        """The group still counts this worker in (or gave it partitions anew)."""
        self.held = True
        self._last_tick = now

    def lose(self) -> None:
        """The group has moved on without this worker (a commit was refused)."""
        self.held = False


class ProduceGate:
    def __init__(self, suspect_after_s: float) -> None:
        self.lease = Lease(suspect_after_s, time.monotonic())
        self._open = asyncio.Event()
        self._open.set()

    def is_open(self) -> bool:
        if self.lease.valid(time.monotonic()):
            return True
        self._open.clear()
        return False

    async def wait(self) -> None:
        await self._open.wait()

    def tick(self) -> bool:
        suspended = self.lease.tick(time.monotonic())
        if suspended:
            self._open.clear()
        return suspended

    def confirm(self) -> None:
        self.lease.confirm(time.monotonic())
        self._open.set()

    def lose(self) -> None:
        self.lease.lose()
        self._open.clear()
