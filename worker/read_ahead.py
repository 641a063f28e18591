"""The read-ahead window: submits fetched from the prompts partitions but not started yet, and
the order they start in (`worker.fair_share`). Pure: the service adds what it fetched, asks
which runs to start when a slot frees, and tells it when one ends.

Bounds (docs/scheduling.md): at most `capacity` runs and `max_bytes` of their submit records
(the encoded size; the decoded objects take a few times that) wait here. The fetch loop asks
`fetch_bound` how many runs the worker may hold in all (running + waiting), so it pauses the
partitions when both the slots and the window are full. A waiting run is admitted in
`Partitions` (its offset pending), so a cancel finds it, a revocation abandons it, and its
offset is never committed before it ran: the commit stays the contiguous finished prefix.

Runs continuing an earlier owner's request (takeover with events already in the log) skip the
line: their clients are mid-stream.

**Overdraft for tenants below their share of the slots.** Generations are not preempted, so
when one tenant's burst holds every slot, another tenant's request would wait for the next slot
to free: up to a whole generation, seconds, against a first token in tens of milliseconds (and
a burst started at once ends in waves, so slots free in bunches). So a waiting request of a
tenant that runs fewer than its weighted share of the slots (`max_inflight` x its weight / the
weights of the tenants running or waiting) may start beyond the slots, up to
`overdraft(max_inflight)` extra (1/16 of them, at least 1). Regular starts wait until fewer than
`max_inflight` run, so the overdraft is paid back by the tenants above their share as their runs
end. Continuous-batching engines take a few more sequences at little cost; the bound keeps the
model server's load bounded all the same. A tenant alone never needs it (its share is every
slot).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from worker.fair_share import FairQueue, request_cost
from worker.run import Run


def overdraft(max_inflight: int) -> int:
    """Runs that may start beyond the slots (for tenants below their share of them)."""
    return max(1, math.ceil(max_inflight / 16))


class ReadAhead:
    def __init__(self, capacity: int, max_bytes: int, aging_s: float) -> None:
        if capacity < 0 or max_bytes < 0:
            raise ValueError("the read-ahead bounds must be >= 0")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._queue: FairQueue[Run] = FairQueue(aging_s)
        self._continuing: deque[Run] = deque()
        self._sizes: dict[int, int] = {}  # id(run) -> encoded size, while it waits
        self._charged: dict[int, float] = {}  # id(run) -> cost charged, while it runs
        self._running: dict[str, int] = {}  # tenant -> runs started and not ended
        self._waiting: dict[str, int] = {}  # tenant -> runs in the fair queue
        self._weights: dict[str, float] = {}  # of the tenants running or waiting
        self.running = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._queue) + len(self._continuing)

    @property
    def full(self) -> bool:
        return len(self) >= self.capacity or (self.bytes >= self.max_bytes and len(self) > 0)

    def fetch_bound(self, max_inflight: int) -> int:
        """How many runs the worker may hold in all: the slots plus what the window takes
        (with its byte bound reached, no more than it holds now)."""
        window = len(self) if self.bytes >= self.max_bytes else self.capacity
        return max_inflight + window

    def add(self, run: Run, size: int, now: float) -> None:
        self._sizes[id(run)] = size
        self.bytes += size
        prior = run.prior
        if prior is not None and (prior.terminal or prior.attempts or prior.last_seq):
            self._continuing.append(run)
            return
        sub = run.submit.submitted
        tenant = run.submit.tenant_id
        weight = float(sub.share or 1)
        cost = request_cost(sub.max_tokens, sub.estimated_prompt_tokens)
        self._queue.add(
            run, tenant=tenant, priority=sub.priority, cost=cost, weight=weight, now=now
        )
        self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
        self._weights[tenant] = weight

    def take(self, max_inflight: int, now: float, alive: Callable[[Run], bool]) -> list[Run]:
        """Runs to start now, in policy order: while fewer than `max_inflight` run, then (the
        overdraft) requests of tenants below their share of the slots. Runs no longer `alive`
        (dropped, revoked) are discarded on the way."""
        out: list[Run] = []
        while self.running < max_inflight:
            run = self._next(now, None, alive)
            if run is None:
                return out
            out.append(run)
        limit = max_inflight + overdraft(max_inflight)
        while self.running < limit:
            run = self._next(now, lambda tenant: self._below_share(tenant, max_inflight), alive)
            if run is None:
                break
            out.append(run)
        return out

    def _next(
        self, now: float, eligible: Callable[[str], bool] | None, alive: Callable[[Run], bool]
    ) -> Run | None:
        while True:
            if self._continuing and eligible is None:
                run = self._continuing.popleft()
            else:
                entry = self._queue.pop(now, eligible)
                if entry is None:
                    return None
                run = entry.item
                self._charged[id(run)] = entry.cost
                self._count_out(self._waiting, entry.tenant)
            self.bytes -= self._sizes.pop(id(run), 0)
            tenant = run.submit.tenant_id
            if alive(run):
                self._running[tenant] = self._running.get(tenant, 0) + 1
                self.running += 1
                return run
            charged = self._charged.pop(id(run), None)
            if charged is not None:  # never ran: nothing to charge
                self._queue.settle(tenant, charged, 0.0, float(run.submit.submitted.share or 1))
            self._forget_weight(tenant)

    def _below_share(self, tenant: str, max_inflight: int) -> bool:
        """The tenant runs fewer than its weighted share of the slots."""
        active = self._running.keys() | self._waiting.keys()
        total = sum(self._weights.get(t, 1.0) for t in active)
        share = max_inflight * self._weights.get(tenant, 1.0) / total
        return self._running.get(tenant, 0) < share

    @staticmethod
    def _count_out(counts: dict[str, int], tenant: str) -> None:
        left = counts.pop(tenant, 0) - 1
        if left > 0:
            counts[tenant] = left

    def _forget_weight(self, tenant: str) -> None:
        if tenant not in self._running and tenant not in self._waiting:
            self._weights.pop(tenant, None)

    def ended(self, run: Run, generated_tokens: int) -> None:
        """A started run ended: its tenant is charged what it really generated."""
        tenant = run.submit.tenant_id
        self.running -= 1
        self._count_out(self._running, tenant)
        self._forget_weight(tenant)
        charged = self._charged.pop(id(run), None)
        if charged is None:
            return
        sub = run.submit.submitted
        used = request_cost(generated_tokens, sub.estimated_prompt_tokens, 1)
        self._queue.settle(tenant, charged, used, float(sub.share or 1))

    def forget(self, gone: Callable[[Run], bool]) -> None:
        """Drop the waiting runs for which `gone` is true (their partitions were revoked)."""
        removed = self._queue.remove(gone)
        for run in removed:
            self._count_out(self._waiting, run.submit.tenant_id)
            self._forget_weight(run.submit.tenant_id)
        kept = deque(r for r in self._continuing if not gone(r))
        removed += [r for r in self._continuing if gone(r)]
        self._continuing = kept
        for run in removed:
            self.bytes -= self._sizes.pop(id(run), 0)
