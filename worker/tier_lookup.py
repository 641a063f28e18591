"""The worker's read-only view of tenant tiers in PostgreSQL (the shell of `tiers.py`).

One small pool (at most 2 connections, opened lazily), one query per tenant not in the cache,
concurrent lookups of one tenant merged into one query, a timeout on each. What happens while
PostgreSQL cannot answer (docs/worker.md, "Tier check"): a tier cached up to
`LLMSTREAM_WORKER_TIER_STALE_S` ago is used; without one the request waits, asking again with
backoff, until PostgreSQL answers or the request's own wall time is spent (then it ends
`failed` `tier_unavailable`). Never fail-open: a submit whose tenant was never seen is not run
unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from llmstream import telemetry
from worker.tiers import Freshness, TenantTier, TierCache, retry_delay_s

log = logging.getLogger("worker")

# One lookup (connection included) may take this long before it counts as failed.
LOOKUP_TIMEOUT_S = 2.0
# `to_jsonb(q) ->> 'share'`: the tier's fair-share weight when the table has that column.
TIER_QUERY = """
SELECT t.id, t.disabled_at IS NOT NULL, q.name, q.max_tokens_per_request,
       coalesce((to_jsonb(q) ->> 'share')::int, 0)
FROM tenants t JOIN quota_tiers q ON q.name = t.tier
WHERE t.id = %s
"""


class TierUnavailable(Exception):
    """PostgreSQL did not answer in time and nothing usable is cached."""


class TierSource(Protocol):
    async def fetch(self, tenant_id: str) -> TenantTier | None: ...


class PgTiers:
    """Tiers straight from PostgreSQL (read-only: one SELECT)."""

    def __init__(self, url: str) -> None:
        # check: a pooled connection is tested before use, so the first lookup after a
        # PostgreSQL restart gets a fresh connection instead of failing.
        self.pool = AsyncConnectionPool(
            url,
            min_size=0,
            max_size=2,
            open=False,
            timeout=LOOKUP_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": int(LOOKUP_TIMEOUT_S)},
            check=AsyncConnectionPool.check_connection,
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def fetch(self, tenant_id: str) -> TenantTier | None:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S), self.pool.connection() as conn:
            cur = await conn.execute(TIER_QUERY, (tenant_id,))
            row = await cur.fetchone()
        if row is None:
            return None
        return TenantTier(
            tenant_id=row[0],
            disabled=bool(row[1]),
            tier=row[2],
            max_tokens_per_request=int(row[3]),
            share=int(row[4]),
        )


# What a failed lookup can raise (connection refused, query error, pool or lookup timeout).
LOOKUP_ERRORS = (psycopg.Error, PoolTimeout, TimeoutError, OSError)


class TierGuard:
    """Tiers through the cache; what the worker asks before it runs a submit."""

    def __init__(
        self,
        source: TierSource,
        cache: TierCache,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.cache = cache
        self.clock = clock
        self._inflight: dict[str, asyncio.Future[TenantTier | None]] = {}
        self._last_warning = 0.0

    async def tier(self, tenant_id: str, deadline: float, stop: asyncio.Event) -> TenantTier | None:
        """The tenant's tier (None: no such tenant). Waits while PostgreSQL cannot answer and
        nothing usable is cached; TierUnavailable at `deadline` (monotonic) or when `stop` is
        set meanwhile."""
        failures = 0
        while True:
            cached = self.cache.get(tenant_id, self.clock())
            if cached.freshness is Freshness.FRESH:
                return cached.tier
            try:
                return await self._lookup(tenant_id)
            except LOOKUP_ERRORS as exc:
                error = f"{type(exc).__name__}: {exc}".strip()
            if cached.freshness is Freshness.STALE:
                self._warn("PostgreSQL unreachable: using a cached tier", tenant_id, error)
                return cached.tier
            failures += 1
            self._warn("PostgreSQL unreachable: the request waits for its tier", tenant_id, error)
            delay = retry_delay_s(failures)
            if self.clock() + delay >= deadline:
                raise TierUnavailable(f"PostgreSQL did not answer ({error})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                raise TierUnavailable("stopped while waiting for PostgreSQL")

    async def _lookup(self, tenant_id: str) -> TenantTier | None:
        """One query per tenant at a time: concurrent callers share its answer."""
        pending = self._inflight.get(tenant_id)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(tenant_id))
            self._inflight[tenant_id] = pending
            pending.add_done_callback(lambda done: self._forget(tenant_id, done))
        return await asyncio.shield(pending)

    def _forget(self, tenant_id: str, done: asyncio.Future[TenantTier | None]) -> None:
        self._inflight.pop(tenant_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: its callers may all have gone (cancelled runs)

    async def _fetch(self, tenant_id: str) -> TenantTier | None:
        tier = await self.source.fetch(tenant_id)
        self.cache.put(tenant_id, tier, self.clock())
        return tier

    def _warn(self, message: str, tenant_id: str, error: str) -> None:
        now = self.clock()
        if now - self._last_warning >= 10.0:  # an outage must not flood the log
            self._last_warning = now
            log.warning(message, extra=telemetry.fields(tenant_id=tenant_id, error=error))
