"""Reservations that never settle: the reaper.

The gateway records every quota reservation it makes (`quota:{T}:reservations`, submit time;
`quota:{T}:reserved`, tokens: llmstream/quota_keys.py). A settlement (the request's terminal
event), or the gateway's own release when the prompt surely was not written, removes the
record. What is left is a reservation whose submit may never have reached the log: the gateway
told its client the outcome was unknown (Kafka did not answer in time), or it died between the
reservation and the write. Such a reservation would hold the tenant's tokens until its windows
expire.

The aggregator is the settler and knows which requests reached the log (every event it
projects makes a `requests` row), so it reaps: every `check_s`, each tenant's records older
than `age_ms` whose request has no `requests` row are taken back from the day and month
counters (once, atomically, only if the record is still there) and counted
(`llmstream_aggregator_reaped_reservations`, `..._reaped_reservation_tokens`).

Reaping never double-counts, even when the submit is delivered after all (a producer retrying
past the bound): its settlement then finds no record and adds the full usage instead of
`usage - reservation`, which is exactly what the counters need once the reservation is gone.
Reaping too early would only let the request run uncounted until it ends, so `age_ms`
(`LLMSTREAM_AGGREGATOR_RESERVATION_REAP_S`) is well beyond any produce retry the gateway waits
for, and requests that are in the log keep their reservation however long they run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from aggregator.metrics import AggregatorMetrics
from llmstream import quota_keys
from llmstream.telemetry import fields

log = logging.getLogger("aggregator")

# KEYS: streams zset, day counter, month counter (of the submit time), reservations zset,
#       reserved hash
# ARGV: request id, cutoff (ms): only a record at least this old is reaped
# Returns the tokens taken back, or -1 when there was nothing to reap (settled, released or
# reaped meanwhile, or younger than the cutoff).
REAP_LUA = """
local at = redis.call('ZSCORE', KEYS[4], ARGV[1])
if not at or tonumber(at) > tonumber(ARGV[2]) then
  return -1
end
local reserved = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if reserved ~= 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('DECRBY', KEYS[2], reserved)
  end
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('DECRBY', KEYS[3], reserved)
  end
end
return reserved
"""

# Records looked at per tenant and pass at most (the oldest first); how often a pass runs.
BATCH = 500
CHECK_S = 30.0
_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reservation:
    tenant_id: str
    request_id: str
    submitted_ms: int


@dataclass(frozen=True)
class Reaped:
    requests: int = 0
    tokens: int = 0


def to_reap(candidates: Iterable[Reservation], in_log: set[str]) -> list[Reservation]:
    """The candidates (all older than the bound) whose request never appeared in the log."""
    return [c for c in candidates if c.request_id not in in_log]


def reap_keys(r: Reservation) -> list[str]:
    return [
        quota_keys.streams(r.tenant_id),
        quota_keys.tokens_day(r.tenant_id, r.submitted_ms),
        quota_keys.tokens_month(r.tenant_id, r.submitted_ms),
        quota_keys.reservations(r.tenant_id),
        quota_keys.reserved(r.tenant_id),
    ]


class ReservationReaper:
    def __init__(
        self,
        client: aioredis.Redis,
        requests_table: sql.Composable,
        age_s: float,
        metrics: AggregatorMetrics,
        check_s: float = CHECK_S,
    ):
        self.client = client
        self.requests_table = requests_table
        self.age_ms = int(age_s * 1000)
        self.metrics = metrics
        self.check_s = check_s
        self._reap = client.register_script(REAP_LUA)
        self._last = 0.0

    async def maybe_reap(self, pool: AsyncConnectionPool, force: bool = False) -> Reaped:
        """A pass every `check_s` (or now with `force`); a failure is logged, the next pass
        tries again."""
        now = time.monotonic()
        if not force and now - self._last < self.check_s:
            return Reaped()
        self._last = now
        try:
            async with pool.connection(timeout=_TIMEOUT_S) as conn:
                reaped = await self.reap(conn, time.time_ns() // 1_000_000)
        except Exception as exc:
            log.warning("reservation reaper failed", extra=fields(error=str(exc)))
            return Reaped()
        if reaped.requests:
            self.metrics.reaped_reservations.add(reaped.requests)
            self.metrics.reaped_tokens.add(reaped.tokens)
            log.warning(
                "reservations reaped: their request never reached the log",
                extra=fields(requests=reaped.requests, tokens=reaped.tokens),
            )
        return reaped

    async def candidates(self, tenants: Sequence[str], cutoff_ms: int) -> list[Reservation]:
        """Every tenant's reservation records at least `age_ms` old (BATCH per tenant)."""
        if not tenants:
            return []
        pipe = self.client.pipeline(transaction=False)
        for t in tenants:
            pipe.zrangebyscore(
                quota_keys.reservations(t), "-inf", cutoff_ms, start=0, num=BATCH, withscores=True
            )
        found: list[Any] = await pipe.execute()
        out = []
        for tenant, members in zip(tenants, found, strict=True):
            for member, score in members:
                rid = member.decode() if isinstance(member, bytes) else str(member)
                out.append(Reservation(tenant, rid, int(score)))
        return out

    async def reap(self, conn: Any, now_ms: int) -> Reaped:
        """One pass (`conn`: a psycopg AsyncConnection; reads only)."""
        cutoff = now_ms - self.age_ms
        cur = await conn.execute("SELECT id FROM public.tenants ORDER BY id")
        tenants = [str(row[0]) for row in await cur.fetchall()]
        found = await self.candidates(tenants, cutoff)
        if not found:
            return Reaped()
        cur = await conn.execute(
            sql.SQL("SELECT request_id FROM {} WHERE request_id = ANY(%s::text[])").format(
                self.requests_table
            ),
            ([c.request_id for c in found],),
        )
        in_log = {str(row[0]) for row in await cur.fetchall()}
        requests = tokens = 0
        for r in to_reap(found, in_log):
            taken: Any = await self._reap(keys=reap_keys(r), args=[r.request_id, cutoff])
            if int(taken) >= 0:
                requests += 1
                tokens += int(taken)
        return Reaped(requests, tokens)
