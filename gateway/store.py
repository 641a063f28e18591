"""The gateway's request store in Redis: what every replica must know about a request.

Keys (the quota's are in llmstream/quota_keys.py, the socket leases in gateway/quota.py, the
browser sessions in gateway/auth.py):
- `gw:req:{request_id}` hash: tenant, topic, partition, offset (a lower bound of the offset of
  the request's first event in its reply partition), submitted_ms, gateway, attached_ms (last
  submit/resume), background ("1": runs whoever follows it), context (what the front end that
  accepted it needs to render it again, opaque here: the OpenAI routes' `StreamContext`),
  finished ("1": the replica reading its reply partition saw its terminal event), cancel (ms:
  a client's cancel was written). 48 h. A resume on any replica starts reading there.
- `gw:watchers:{request_id}` set of "<gateway id>/<socket or stream id>" following the request;
  a grace timer cancels only when it is empty (nobody on any replica follows the request) and
  the request is not a background one. 48 h.
- `gw:idem:{tenant}:<sha256(idempotency_key)>` -> request id, 24 h.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

META_TTL_S = 48 * 3600
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_REQUEST_ID_CHARS = 128


def meta_key(request_id: str) -> str:
    return f"gw:req:{request_id}"


def watchers_key(request_id: str) -> str:
    return f"gw:watchers:{request_id}"


def idempotency_key(tenant_id: str, key: str) -> str:
    return f"gw:idem:{{{tenant_id}}}:{hashlib.sha256(key.encode()).hexdigest()}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ReplyRoute:
    """Where a request's events are produced, and from which offset on they can be."""

    topic: str
    partition: int
    offset: int  # a lower bound of the offset of the request's first event


@dataclass(frozen=True)
class RequestMeta:
    request_id: str
    tenant_id: str
    route: ReplyRoute
    submitted_ms: int
    gateway_id: str  # the replica that accepted it
    background: bool = False  # keeps running when nobody follows it
    context: str = ""  # the accepting front end's, opaque (empty: none)
    finished: bool = False  # its terminal event was read (set after the record is made)

    def mapping(self) -> dict[str, str | int]:
        return {
            "tenant": self.tenant_id,
            "topic": self.route.topic,
            "partition": self.route.partition,
            "offset": self.route.offset,
            "submitted_ms": self.submitted_ms,
            "gateway": self.gateway_id,
            "attached_ms": self.submitted_ms,
            "background": int(self.background),
            "context": self.context,
        }

    @classmethod
    def parse(cls, request_id: str, fields: dict[str, str]) -> RequestMeta:
        route = ReplyRoute(fields["topic"], int(fields["partition"]), int(fields["offset"]))
        return cls(
            request_id,
            fields["tenant"],
            route,
            int(fields["submitted_ms"]),
            fields["gateway"],
            # Records written before these fields existed have neither.
            background=fields.get("background") == "1",
            context=fields.get("context", ""),
            finished=fields.get("finished") == "1",
        )


# Mark a request finished, only if it has a record: KEYS: its record
MARK_FINISHED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'finished', '1')
end
return 1
"""

# Claim the one cancel of a request: KEYS: its record; ARGV: now ms. 1: claimed; 0: claimed
# before, or no record.
CLAIM_CANCEL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
return redis.call('HSETNX', KEYS[1], 'cancel', ARGV[1])
"""

# Compare-and-set of an idempotency key: KEYS: the key; ARGV: expected holder, new holder, TTL s
TAKE_OVER_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


class RequestStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._take_over = client.register_script(TAKE_OVER_LUA)
        self._mark_finished = client.register_script(MARK_FINISHED_LUA)
        self._claim_cancel = client.register_script(CLAIM_CANCEL_LUA)

    # -- request metadata ---------------------------------------------------------------------

    async def record(self, meta: RequestMeta, watcher: str) -> None:
        """A new request and its first follower."""
        rid = meta.request_id
        fields: Any = meta.mapping()
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(meta_key(rid), mapping=fields)
        pipe.expire(meta_key(rid), META_TTL_S)
        pipe.sadd(watchers_key(rid), watcher)
        pipe.expire(watchers_key(rid), META_TTL_S)
        await pipe.execute()

    async def mark_finished(self, request_ids: list[str]) -> None:
        """Their terminal events were read: a cancel needs no write any more."""
        pipe = self.client.pipeline(transaction=False)
        for rid in request_ids:  # one key per script: Redis Cluster slots
            await self._mark_finished(keys=[meta_key(rid)], args=[], client=pipe)
        await pipe.execute()

    async def claim_cancel(self, request_id: str) -> bool:
        """True for the first cancel of the request (write it), False for any other."""
        result: Any = await self._claim_cancel(keys=[meta_key(request_id)], args=[now_ms()])
        return int(result) == 1

    async def unclaim_cancel(self, request_id: str) -> None:
        """The claimed cancel could not be written: the next one may try."""
        removed: Any = self.client.hdel(meta_key(request_id), "cancel")
        await removed

    async def forget(self, request_id: str) -> None:
        """A request whose prompt was never written."""
        await self.client.delete(meta_key(request_id))

    async def lookup(self, tenant_id: str, request_id: str) -> RequestMeta | None:
        """The request's metadata if it exists and belongs to `tenant_id` (another tenant's
        request is indistinguishable from a missing one)."""
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            return None
        raw: Any = await self.client.hgetall(meta_key(request_id))
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if not fields or fields.get("tenant") != tenant_id:
            return None
        return RequestMeta.parse(request_id, fields)

    async def wait_for(
        self, tenant_id: str, request_id: str, attempts: int = 40, interval_s: float = 0.025
    ) -> RequestMeta | None:
        """The metadata of a request another submit (same idempotency key) may still be
        recording: a moment's patience instead of a spurious `not_found`."""
        for _ in range(attempts):
            meta = await self.lookup(tenant_id, request_id)
            if meta is not None:
                return meta
            await asyncio.sleep(interval_s)
        return None

    # -- followers ----------------------------------------------------------------------------

    async def attach(self, request_id: str, watcher: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(watchers_key(request_id), watcher)
        pipe.expire(watchers_key(request_id), META_TTL_S)
        pipe.hset(meta_key(request_id), "attached_ms", now_ms())
        await pipe.execute()

    async def detach(self, request_id: str, watcher: str) -> None:
        removed: Any = self.client.srem(watchers_key(request_id), watcher)
        await removed

    async def wanted_since(self, request_id: str, since_ms: int) -> bool:
        """Does anyone (on any replica) follow the request, did someone attach after `since_ms`
        (and may have left again, starting its own grace period), or is it a background
        request (wanted whoever follows it)?"""
        pipe = self.client.pipeline(transaction=False)
        pipe.scard(watchers_key(request_id))
        pipe.hmget(meta_key(request_id), ["attached_ms", "background"])
        count, (attached, background) = await pipe.execute()
        return (
            int(count) > 0
            or (attached is not None and int(attached) > since_ms)
            or _text(background or b"") == "1"
        )

    # -- idempotency keys ---------------------------------------------------------------------

    async def claim_idempotency(self, tenant_id: str, key: str, request_id: str) -> str | None:
        """Claim the tenant's idempotency key for `request_id`; the request that holds it
        already, if another does."""
        k = idempotency_key(tenant_id, key)
        if await self.client.set(k, request_id, nx=True, ex=IDEMPOTENCY_TTL_S):
            return None
        existing: Any = await self.client.get(k)
        # Expired between the two calls: proceed as a new request (as if it had been claimed).
        return _text(existing) if existing else None

    async def take_over_idempotency(
        self, tenant_id: str, key: str, stale: str, request_id: str
    ) -> bool:
        """Pass the key from `stale` (a request that has no record) to `request_id`, unless it
        changed meanwhile; True if it is `request_id`'s now."""
        result: Any = await self._take_over(
            keys=[idempotency_key(tenant_id, key)], args=[stale, request_id, IDEMPOTENCY_TTL_S]
        )
        return int(result) == 1

    async def release_idempotency(self, tenant_id: str, key: str) -> None:
        await self.client.delete(idempotency_key(tenant_id, key))
