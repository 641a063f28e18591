"""Model server choice: least in-flight replica, cooldown after failures, backoff with jitter."""

from __future__ import annotations

import random
from collections.abc import Iterable


class Router:
    """Chooses a replica per request attempt by fewest requests in flight from this worker.

    A replica that failed (UNAVAILABLE) is avoided for `cooldown_s` unless every replica is
    cooling down; `exclude` lets a retry prefer a different replica than the one that failed.
    """

    def __init__(self, replicas: Iterable[str], cooldown_s: float = 2.0) -> None:
        self.replicas = list(dict.fromkeys(replicas))
        if not self.replicas:
            raise ValueError("no model server replicas configured")
        self.cooldown_s = cooldown_s
        self.inflight: dict[str, int] = {r: 0 for r in self.replicas}
        self._failed_until: dict[str, float] = {}
        self._next = 0  # round-robin among ties

    def pick(self, now: float, exclude: Iterable[str] = ()) -> str:
        excluded = set(exclude)
        healthy = [r for r in self.replicas if self._failed_until.get(r, 0.0) <= now]
        candidates = [r for r in healthy if r not in excluded] or healthy
        if not candidates:
            candidates = [r for r in self.replicas if r not in excluded] or self.replicas
        least = min(self.inflight[r] for r in candidates)
        ties = [r for r in candidates if self.inflight[r] == least]
        self._next += 1
        return ties[self._next % len(ties)]

    def acquire(self, replica: str) -> None:
        self.inflight[replica] += 1

    def release(self, replica: str) -> None:
        self.inflight[replica] -= 1

    def failed(self, replica: str, now: float) -> None:
        self._failed_until[replica] = now + self.cooldown_s

    def succeeded(self, replica: str) -> None:
        self._failed_until.pop(replica, None)


def backoff_s(retry: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `retry` (1, 2, ...): exponential, capped, "equal jitter"
    (half fixed, half random) so synchronized workers spread out but never retry at once."""
    if retry < 1:
        raise ValueError("retry counts from 1")
    ceiling = float(min(cap_s, base_s * 2.0 ** (retry - 1)))
    r: float = (rng or random).random()
    return ceiling / 2 + r * ceiling / 2
