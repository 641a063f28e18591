"""`/readyz` without letting its callers set the pace of the dependency probes.

The probes (a Redis ping, a PostgreSQL query, a Kafka metadata call) cost the dependencies
work, and `/readyz` needs no credentials: `ProbeCache` runs them at most once per `interval_s`
however many requests arrive, and callers arriving while a probe runs share it (one in flight
at most). What is cheap and must be current (draining, dead loops) is checked on every call by
the gateway, outside the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Checks = dict[str, str]

# How old the probes' answer served by /readyz may be.
INTERVAL_S = 1.0


class ProbeCache:
    def __init__(
        self,
        probe: Callable[[], Awaitable[Checks]],
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.clock = clock
        self.probes = 0  # probes run (tests assert the bound)
        self._checks: Checks | None = None
        self._at = 0.0
        self._running: asyncio.Task[Checks] | None = None

    async def checks(self) -> Checks:
        if self._checks is not None and self.clock() - self._at < self.interval_s:
            return dict(self._checks)
        if self._running is None:
            self._running = asyncio.create_task(self._run())
        # Shielded: a caller that goes away does not cancel the probe the others wait for.
        return dict(await asyncio.shield(self._running))

    async def _run(self) -> Checks:
        try:
            self.probes += 1
            checks = await self.probe()
            self._checks, self._at = checks, self.clock()
            return checks
        finally:
            self._running = None
