"""Requests in flight on this replica (no I/O).

`running`: accepted here, terminal event not read yet; its size is the load the admission
sheds on (`GATEWAY_MAX_INFLIGHT`). `recent`: ids whose terminal event this replica read
(bounded), so that a grace timer does not cancel a finished request and `GET /v1/requests/{id}`
can say `finished` before the aggregator's projection has it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RECENT_MAX = 100_000


class Inflight:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.running: dict[str, float] = {}  # request id -> monotonic time accepted
        self.recent: dict[str, None] = {}  # insertion-ordered, bounded

    def __len__(self) -> int:
        return len(self.running)

    def add(self, request_id: str) -> None:
        self.running[request_id] = self.clock()

    def discard(self, request_id: str) -> None:
        """A submit rolled back: it never ran."""
        self.running.pop(request_id, None)

    def finish(self, request_id: str) -> bool:
        """A terminal event was read; True if the request was accepted here and running."""
        was_running = self.running.pop(request_id, None) is not None
        self.recent[request_id] = None
        if len(self.recent) > RECENT_MAX:
            for rid in list(self.recent)[: RECENT_MAX // 2]:
                del self.recent[rid]
        return was_running

    def finished(self, request_id: str) -> bool:
        return request_id in self.recent

    def expire(self, older_than_s: float) -> None:
        """Forget requests whose terminal event never came (so the load count cannot leak)."""
        cutoff = self.clock() - older_than_s
        for rid in [r for r, t in self.running.items() if t < cutoff]:
            del self.running[rid]
