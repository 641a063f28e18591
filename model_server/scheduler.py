"""Admission of sequences to a fixed number of decode slots.

Waiters are served by priority (higher first), then in arrival order (FIFO), which is fair
among equal priorities. The length of the queue is bounded one level up (``ModelHandle``
admission), so this class never grows without bound. A waiter that is cancelled (the client
went away, the queue timeout fired) leaves the queue; a slot granted to a waiter that was
cancelled at the same moment is handed on, never leaked.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class SlotScheduler:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self._free: list[int] = list(range(slots - 1, -1, -1))
        self._heap: list[tuple[int, int, asyncio.Future[int]]] = []
        self._order = itertools.count()
        self._waiting = 0
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
        self._compact()
        heapq.heappush(self._heap, (-priority, next(self._order), fut))
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

    def release(self, slot: int) -> None:
        while self._heap:
            _prio, _order, fut = heapq.heappop(self._heap)
            if fut.done():  # cancelled while waiting
                continue
            self._waiting -= 1
            fut.set_result(slot)
            return
        self._free.append(slot)

    def _compact(self) -> None:
        # Futures of cancelled waiters stay in the heap until popped; drop them when they pile up.
        if len(self._heap) > 2 * self._waiting + 32:
            self._heap = [e for e in self._heap if not e[2].done()]
            heapq.heapify(self._heap)
