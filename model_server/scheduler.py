"""Admission of sequences to a fixed number of decode slots.

Waiters are served by priority class (higher first), then in arrival order (FIFO), with the
worker's aging rule (docs/scheduling.md): a waiter's effective priority rises by one class per
`aging_s` it has waited, up to the highest class waiting, and among equal effective classes the
oldest goes first. So interactive sequences overtake queued batch ones, and a batch sequence
behind a continuous stream of interactive ones still gets a slot after waiting
`aging_s x (class gap)`. Within a class the order is FIFO, so only class heads are compared:
a grant costs O(classes waiting).

The length of the queue is bounded one level up (``ModelHandle`` admission), so this class never
grows without bound. A waiter that is cancelled (the client went away, the queue timeout fired)
leaves the queue; a slot granted to a waiter that was cancelled at the same moment is handed
on, never leaked.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# The worker's default (LLMSTREAM_WORKER_AGING_S): the same policy in front of the engine.
AGING_S = 10.0


@dataclass(eq=False)
class _Waiter:
    priority: int
    arrived: float
    order: int
    future: asyncio.Future[int]


class SlotScheduler:
    def __init__(
        self, slots: int, aging_s: float = AGING_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if aging_s <= 0:
            raise ValueError("aging_s must be > 0")
        self._free: list[int] = list(range(slots - 1, -1, -1))
        self._classes: dict[int, deque[_Waiter]] = {}
        self._order = itertools.count()
        self._waiting = 0
        self._clock = clock
        self.aging_s = aging_s
        self.slots = slots

    @property
    def running(self) -> int:
        return self.slots - len(self._free)

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self, priority: int = 0) -> int:
        """Wait for a slot and return its index (0 .. slots-1)."""
        if self._free and not self._waiting:
            return self._free.pop()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(priority, self._clock(), next(self._order), fut)
        self._classes.setdefault(priority, deque()).append(waiter)
        self._waiting += 1
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted and cancelled in the same loop iteration: pass the slot on.
                self.release(fut.result())
            raise
        finally:
            if not fut.done() or fut.cancelled():
                self._waiting -= 1
                self._leave(waiter)

    def release(self, slot: int) -> None:
        while (waiter := self._next()) is not None:
            if waiter.future.done():  # cancelled, its task not resumed yet to leave the queue
                continue
            self._waiting -= 1
            waiter.future.set_result(slot)
            return
        self._free.append(slot)

    def _next(self) -> _Waiter | None:
        """Take the waiter to serve: highest effective class, then the oldest."""
        if not self._classes:
            return None
        now = self._clock()
        top = max(self._classes)
        best: tuple[int, int] | None = None
        chosen: deque[_Waiter] | None = None
        for priority, queue in self._classes.items():
            head = queue[0]
            aged = priority + math.floor(max(0.0, now - head.arrived) / self.aging_s)
            key = (-min(aged, top), head.order)
            if best is None or key < best:
                best, chosen = key, queue
        assert chosen is not None
        waiter = chosen.popleft()
        if not chosen:
            del self._classes[waiter.priority]
        return waiter

    def _leave(self, waiter: _Waiter) -> None:
        """A cancelled waiter leaves its class queue (O(queue), on cancellation only)."""
        queue = self._classes.get(waiter.priority)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return  # already taken by `_next`
        if not queue:
            del self._classes[waiter.priority]
