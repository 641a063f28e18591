"""Quota reservation in Redis: one Lua script checks and reserves atomically.

Key layout is llmstream/quota_keys.py (shared with the aggregator, which settles each
reservation with the terminal event's usage via aggregator/quota_settlement.py). Windows are
chosen from the `submitted` event's event_time, as the settlement does.

Checks, in order: concurrent streams (stale leases dropped first), requests per minute, tokens
per day, tokens per month (estimate = prompt tokens + max_tokens). On refusal nothing is
written and the reply says which limit and how long to wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from llmstream import quota_keys

# KEYS: streams zset, minute counter, day counter, month counter, reservations zset, reserved hash
# ARGV: now_ms, request_id, lease_expiry_ms, reserved, max_streams, rpm, tokens_day,
#       tokens_month, minute expiry, day expiry, month expiry, minute end ms, day end ms,
#       month end ms, submit ms (the windows' time), reservations TTL ms
RESERVE_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return {1, 'already'}
end
local reserved = tonumber(ARGV[4])
local streams = redis.call('ZCARD', KEYS[1])
if streams >= tonumber(ARGV[5]) then
  return {0, 'concurrent_streams', 1000}
end
local minute = tonumber(redis.call('GET', KEYS[2]) or '0')
if minute >= tonumber(ARGV[6]) then
  return {0, 'requests_per_minute', tonumber(ARGV[12]) - now}
end
local day = tonumber(redis.call('GET', KEYS[3]) or '0')
if day + reserved > tonumber(ARGV[7]) then
  return {0, 'tokens_per_day', tonumber(ARGV[13]) - now}
end
local month = tonumber(redis.call('GET', KEYS[4]) or '0')
if month + reserved > tonumber(ARGV[8]) then
  return {0, 'tokens_per_month', tonumber(ARGV[14]) - now}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('INCR', KEYS[2])
redis.call('PEXPIREAT', KEYS[2], ARGV[9])
redis.call('INCRBY', KEYS[3], reserved)
redis.call('PEXPIREAT', KEYS[3], ARGV[10])
redis.call('INCRBY', KEYS[4], reserved)
redis.call('PEXPIREAT', KEYS[4], ARGV[11])
redis.call('ZADD', KEYS[5], ARGV[15], ARGV[2])
redis.call('PEXPIRE', KEYS[5], ARGV[16])
redis.call('HSET', KEYS[6], ARGV[2], reserved)
redis.call('PEXPIRE', KEYS[6], ARGV[16])
return {1, 'ok'}
"""

# Undo a reservation whose submit surely never reached Kafka (so the aggregator will never
# settle it): takes back exactly what the reservation recorded, once (a second release, or a
# release after the aggregator settled or reaped it, changes nothing).
# KEYS: streams, minute, day, month, reservations, reserved; ARGV: request_id
RELEASE_LUA = """
local reserved = redis.call('HGET', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if not reserved then
  return 0
end
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('DECR', KEYS[2])
redis.call('DECRBY', KEYS[3], reserved)
redis.call('DECRBY', KEYS[4], reserved)
return 1
"""


# Tenant socket cap across replicas: KEYS: sockets zset; ARGV: member, max, now, expiry
OPEN_SOCKET_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return 1
"""


def sockets_key(tenant_id: str) -> str:
    """Open sockets of a tenant on all gateway replicas: member "<gateway>/<socket>", score =
    lease expiry (ms). Same hash tag as the quota keys."""
    return f"{quota_keys.PREFIX}:{{{tenant_id}}}:sockets"


@dataclass(frozen=True)
class Limits:
    """A tenant's tier (quota_tiers row)."""

    tier: str
    requests_per_minute: int
    tokens_per_day: int
    tokens_per_month: int
    max_concurrent_streams: int
    max_tokens_per_request: int
    max_sockets: int


@dataclass(frozen=True)
class Decision:
    ok: bool
    limit: str = ""
    retry_after_ms: int = 0


def keys(tenant_id: str, at_ms: int) -> list[str]:
    return [
        quota_keys.streams(tenant_id),
        quota_keys.requests_minute(tenant_id, at_ms),
        quota_keys.tokens_day(tenant_id, at_ms),
        quota_keys.tokens_month(tenant_id, at_ms),
        quota_keys.reservations(tenant_id),
        quota_keys.reserved(tenant_id),
    ]


def reserve_args(
    request_id: str, at_ms: int, now_ms: int, reserved: int, limits: Limits, lease_ms: int
) -> list[int | str]:
    return [
        now_ms,
        request_id,
        now_ms + lease_ms,
        reserved,
        limits.max_concurrent_streams,
        limits.requests_per_minute,
        limits.tokens_per_day,
        limits.tokens_per_month,
        quota_keys.expire_minute_at_ms(at_ms),
        quota_keys.expire_day_at_ms(at_ms),
        quota_keys.expire_month_at_ms(at_ms),
        quota_keys.minute_start_ms(at_ms) + 60_000,
        quota_keys.day_end_ms(at_ms),
        quota_keys.month_end_ms(at_ms),
        at_ms,
        quota_keys.RESERVATIONS_TTL_MS,
    ]


class Quota:
    def __init__(self, client: aioredis.Redis, lease_ms: int = quota_keys.DEFAULT_STREAM_LEASE_MS):
        self.client = client
        self.lease_ms = lease_ms
        self._reserve = client.register_script(RESERVE_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._open_socket = client.register_script(OPEN_SOCKET_LUA)

    async def open_socket(
        self, tenant_id: str, member: str, max_sockets: int, now_ms: int, lease_ms: int
    ) -> bool:
        result: Any = await self._open_socket(
            keys=[sockets_key(tenant_id)], args=[member, max_sockets, now_ms, now_ms + lease_ms]
        )
        return int(result) == 1

    async def end_streams(self, finished: list[tuple[str, str]]) -> None:
        """(tenant, request id) pairs whose terminal event was seen: free their stream slot."""
        pipe = self.client.pipeline(transaction=False)
        for tenant_id, request_id in finished:
            pipe.zrem(quota_keys.streams(tenant_id), request_id)
        await pipe.execute()

    async def close_socket(self, tenant_id: str, member: str) -> None:
        removed: Any = self.client.zrem(sockets_key(tenant_id), member)
        await removed

    async def refresh_sockets(self, members: list[tuple[str, str]], expiry_ms: int) -> None:
        if not members:
            return
        pipe = self.client.pipeline(transaction=False)
        for tenant_id, member in members:
            pipe.zadd(sockets_key(tenant_id), {member: expiry_ms}, xx=True)
            pipe.pexpireat(sockets_key(tenant_id), expiry_ms)
        await pipe.execute()

    async def reserve(
        self,
        tenant_id: str,
        request_id: str,
        at_ms: int,
        now_ms: int,
        reserved: int,
        limits: Limits,
        lease_ms: int | None = None,
    ) -> Decision:
        result: Any = await self._reserve(
            keys=keys(tenant_id, at_ms),
            args=reserve_args(
                request_id, at_ms, now_ms, reserved, limits, lease_ms or self.lease_ms
            ),
        )
        if int(result[0]) == 1:
            return Decision(True)
        limit = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        return Decision(False, limit, max(1, int(result[2])))

    async def release(self, tenant_id: str, request_id: str, at_ms: int) -> bool:
        """Take back the reservation of a submit that surely never reached Kafka (what it
        recorded, once); False if there is none (released, settled or reaped already)."""
        result: Any = await self._release(keys=keys(tenant_id, at_ms), args=[request_id])
        return int(result) == 1
