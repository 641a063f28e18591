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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from worker.fair_share import FairQueue, request_cost
from worker.run import Run


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
        cost = request_cost(sub.max_tokens, sub.estimated_prompt_tokens)
        self._queue.add(
            run,
            tenant=run.submit.tenant_id,
            priority=sub.priority,
            cost=cost,
            weight=float(sub.share or 1),
            now=now,
        )

    def take(self, slots: int, now: float, alive: Callable[[Run], bool]) -> list[Run]:
        """Up to `slots` runs to start now, in policy order; runs no longer `alive` (dropped,
        revoked) are discarded on the way."""
        out: list[Run] = []
        while len(out) < slots:
            if self._continuing:
                run = self._continuing.popleft()
            else:
                entry = self._queue.pop(now)
                if entry is None:
                    break
                run = entry.item
                self._charged[id(run)] = entry.cost
            self.bytes -= self._sizes.pop(id(run), 0)
            if alive(run):
                out.append(run)
            else:
                self._charged.pop(id(run), None)
        return out

    def ended(self, run: Run, generated_tokens: int) -> None:
        """A started run ended: its tenant is charged what it really generated."""
        charged = self._charged.pop(id(run), None)
        if charged is None:
            return
        sub = run.submit.submitted
        used = request_cost(generated_tokens, sub.estimated_prompt_tokens, 1)
        self._queue.settle(run.submit.tenant_id, charged, used, float(sub.share or 1))

    def forget(self, gone: Callable[[Run], bool]) -> None:
        """Drop the waiting runs for which `gone` is true (their partitions were revoked)."""
        removed = self._queue.remove(gone)
        kept = deque(r for r in self._continuing if not gone(r))
        removed += [r for r in self._continuing if gone(r)]
        self._continuing = kept
        for run in removed:
            self.bytes -= self._sizes.pop(id(run), 0)
