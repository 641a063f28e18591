"""Quota settlement and rebuild in Redis (key layout: llmstream/quota_keys.py).

Settlement replaces a request's reservation with its actual usage: the gateway added its
reservation to the tenant's day and month counters at admission and recorded the amount
(`quota:{T}:reserved`); on the terminal event the aggregator adds `used - recorded` to the same
windows (chosen from the submit time), drops the record and removes the request from the
tenant's in-flight streams. The amount taken back is the one the gateway recorded, never the
event's `reserved_tokens`: an event forged with a huge value cannot drive a tenant's counter
negative, and a reservation already released or reaped (no record) is taken back zero times
more. One Lua script does it atomically and idempotently: `SADD` of the request id into the
day's settled set comes first, and a request already in the set changes nothing. So a
settlement retried after a crash (the outbox in PostgreSQL makes settlement at-least-once) is
applied exactly once.

Rebuild (Redis lost or suspect): the counters of the current windows are recomputed from the
`requests` projection — usage of billed requests + reservations of unfinished ones — and set
per tenant in one script, with the reservation records (one per unfinished request, what a
settlement takes back); pending outbox settlements are marked settled first, since the rebuilt
numbers already contain their usage. Here the reservation can only come from the events: it is
clamped to the tenant tier's `tokens_per_day` (no reservation above it can have been admitted),
so a forged `reserved_tokens` cannot lock a tenant out either (a tenant PostgreSQL does not
know has no tier to clamp to, and no gateway admits it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from psycopg import sql

from aggregator.store import Settlement
from llmstream import quota_keys

# KEYS: settled set, day counter, month counter, streams zset, reservations zset, reserved hash
# ARGV: request id, used tokens, day expiry, month expiry, settled-set expiry (PEXPIREAT ms)
SETTLE_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
local reserved = tonumber(redis.call('HGET', KEYS[6], ARGV[1]) or '0')
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
local delta = tonumber(ARGV[2]) - reserved
if delta ~= 0 then
  redis.call('INCRBY', KEYS[2], delta)
  redis.call('PEXPIREAT', KEYS[2], ARGV[3])
  redis.call('INCRBY', KEYS[3], delta)
  redis.call('PEXPIREAT', KEYS[3], ARGV[4])
end
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: day counter, month counter, minute counter, streams zset, reservations zset, reserved hash
# ARGV: day tokens, month tokens, minute requests, day expiry, month expiry, minute expiry,
#       reservations TTL ms, number of streams n, then n (member, score) pairs of in-flight
#       streams, then (member, submit ms, reserved) triples of reservations
REBUILD_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'PXAT', ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'PXAT', ARGV[6])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6])
local n = tonumber(ARGV[8])
for i = 9, 8 + 2 * n, 2 do
  redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i])
end
for i = 9 + 2 * n, #ARGV, 3 do
  redis.call('ZADD', KEYS[5], ARGV[i + 1], ARGV[i])
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 2])
end
redis.call('PEXPIRE', KEYS[5], ARGV[7])
redis.call('PEXPIRE', KEYS[6], ARGV[7])
return 1
"""

# KEYS: settled set; ARGV: expiry, request ids
MARK_SETTLED_LUA = """
for i = 2, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
end
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
"""


def settle_args(s: Settlement) -> tuple[list[str], list[int | str]]:
    """KEYS and ARGV of SETTLE_LUA for one settlement (pure; unit-tested)."""
    at = s.submitted_at_ms
    keys = [
        quota_keys.settled(s.tenant_id, at),
        quota_keys.tokens_day(s.tenant_id, at),
        quota_keys.tokens_month(s.tenant_id, at),
        quota_keys.streams(s.tenant_id),
        quota_keys.reservations(s.tenant_id),
        quota_keys.reserved(s.tenant_id),
    ]
    args: list[int | str] = [
        s.request_id,
        s.used_tokens,
        quota_keys.expire_day_at_ms(at),
        quota_keys.expire_month_at_ms(at),
        quota_keys.expire_day_at_ms(at),
    ]
    return keys, args


class QuotaSettler:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._settle = client.register_script(SETTLE_LUA)
        self._rebuild = client.register_script(REBUILD_LUA)
        self._mark = client.register_script(MARK_SETTLED_LUA)

    async def settle(self, settlements: Sequence[Settlement]) -> int:
        """Apply settlements (one round trip); returns how many were new (not already settled)."""
        if not settlements:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for s in settlements:
            keys, args = settle_args(s)
            await self._settle(keys=keys, args=args, client=pipe)
        results: list[Any] = await pipe.execute()
        return sum(int(r) for r in results)

    async def mark_settled(self, settlements: Sequence[Settlement]) -> None:
        by_key: dict[tuple[str, int], list[str]] = {}
        for s in settlements:
            key = quota_keys.settled(s.tenant_id, s.submitted_at_ms)
            by_key.setdefault((key, quota_keys.expire_day_at_ms(s.submitted_at_ms)), []).append(
                s.request_id
            )
        for (key, expiry), ids in by_key.items():
            await self._mark(keys=[key], args=[expiry, *ids])

    async def set_windows(self, totals: TenantWindows, now_ms: int) -> None:
        t = totals.tenant_id
        keys = [
            quota_keys.tokens_day(t, now_ms),
            quota_keys.tokens_month(t, now_ms),
            quota_keys.requests_minute(t, now_ms),
            quota_keys.streams(t),
            quota_keys.reservations(t),
            quota_keys.reserved(t),
        ]
        args: list[int | str] = [
            totals.day_tokens,
            totals.month_tokens,
            totals.minute_requests,
            quota_keys.expire_day_at_ms(now_ms),
            quota_keys.expire_month_at_ms(now_ms),
            quota_keys.expire_minute_at_ms(now_ms),
            quota_keys.RESERVATIONS_TTL_MS,
            len(totals.streams),
        ]
        for request_id, lease_expiry_ms in totals.streams:
            args += [request_id, lease_expiry_ms]
        for request_id, submitted_ms, reserved in totals.reservations:
            args += [request_id, submitted_ms, reserved]
        await self._rebuild(keys=keys, args=args)


@dataclass
class TenantWindows:
    """A tenant's quota counters for the windows containing `now`, as PostgreSQL sees them."""

    tenant_id: str
    day_tokens: int = 0
    month_tokens: int = 0
    minute_requests: int = 0
    streams: list[tuple[str, int]] = field(default_factory=list)
    # (request id, submit ms, reserved tokens) of unfinished requests: their reservation records
    reservations: list[tuple[str, int, int]] = field(default_factory=list)


# The tier of a request's tenant (public schema: tenants are not projected), and the
# reservation of an unfinished request bounded by it.
_TIERS = sql.SQL(
    "LEFT JOIN public.tenants tn ON tn.id = r.tenant_id"
    " LEFT JOIN public.quota_tiers qt ON qt.name = tn.tier"
)
_CLAMPED_RESERVED = sql.SQL(
    "LEAST(r.reserved_tokens, coalesce(qt.tokens_per_day, r.reserved_tokens))"
)


async def rebuild_from_postgres(
    conn: Any,
    settler: QuotaSettler,
    requests_table: Any,
    outbox_table: Any,
    now_ms: int,
    lease_ms: int = quota_keys.DEFAULT_STREAM_LEASE_MS,
) -> dict[str, int]:
    """Recompute the current windows of every tenant from PostgreSQL and set them in Redis.

    `conn` is an autocommit psycopg AsyncConnection; the tables are psycopg sql identifiers.
    Meant for recovery with the gateways drained (a reservation made while this runs can be
    overwritten). Returns counts for the operator.
    """
    from aggregator.projection import dt_to_ms, ms_to_dt

    day, month = quota_keys.day_start_ms(now_ms), quota_keys.month_start_ms(now_ms)
    minute = quota_keys.minute_start_ms(now_ms)
    windows: dict[str, TenantWindows] = {}
    pending: list[Settlement] = []
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        # An unfinished request counts its reservation, clamped to its tier's tokens_per_day.
        amount = sql.SQL(
            "CASE WHEN billed THEN prompt_tokens + completion_tokens ELSE {r} END"
        ).format(r=_CLAMPED_RESERVED)
        cur = await conn.execute(
            sql.SQL(
                "SELECT r.tenant_id, coalesce(sum({a}) FILTER (WHERE submitted_at >= %s), 0),"
                " coalesce(sum({a}), 0), count(*) FILTER (WHERE submitted_at >= %s)"
                " FROM {t} r {tiers} WHERE r.tenant_id IS NOT NULL AND submitted_at >= %s"
                " AND submitted_at < %s GROUP BY r.tenant_id"
            ).format(a=amount, t=requests_table, tiers=_TIERS),
            (
                ms_to_dt(day),
                ms_to_dt(minute),
                ms_to_dt(month),
                ms_to_dt(quota_keys.month_end_ms(now_ms)),
            ),
        )
        for tenant, day_tokens, month_tokens, minute_requests in await cur.fetchall():
            windows[tenant] = TenantWindows(
                tenant, int(day_tokens), int(month_tokens), int(minute_requests)
            )
        cur = await conn.execute(
            sql.SQL(
                "SELECT r.tenant_id, request_id, submitted_at, {r} FROM {t} r {tiers}"
                " WHERE r.tenant_id IS NOT NULL AND NOT billed"
                " AND status IN ('unknown', 'queued', 'running') AND submitted_at >= %s"
                " ORDER BY request_id"
            ).format(r=_CLAMPED_RESERVED, t=requests_table, tiers=_TIERS),
            (ms_to_dt(month),),
        )
        for tenant, request_id, submitted_at, reserved in await cur.fetchall():
            w = windows.setdefault(tenant, TenantWindows(tenant))
            at = dt_to_ms(submitted_at)
            w.reservations.append((request_id, at, int(reserved)))
            if at >= now_ms - lease_ms:
                w.streams.append((request_id, at + lease_ms))
        cur = await conn.execute(
            sql.SQL(
                "SELECT request_id, tenant_id, submitted_at, reserved_tokens, used_tokens FROM {t}"
            ).format(t=outbox_table)
        )
        pending = [
            Settlement(rid, tenant, dt_to_ms(at), int(reserved), int(used))
            for rid, tenant, at, reserved, used in await cur.fetchall()
        ]
    # Pending settlements are already counted as usage above: mark them settled first, so that
    # an aggregator sweeping the outbox meanwhile cannot apply them on top.
    await settler.mark_settled(pending)
    for w in windows.values():
        await settler.set_windows(w, now_ms)
    if pending:
        await conn.execute(
            sql.SQL("DELETE FROM {t} WHERE request_id = ANY(%s::text[])").format(t=outbox_table),
            ([s.request_id for s in pending],),
        )
    return {
        "tenants": len(windows),
        "streams": sum(len(w.streams) for w in windows.values()),
        "pending_marked": len(pending),
    }
