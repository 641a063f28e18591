"""Authentication: API keys (PostgreSQL, SHA-256, cached briefly), browser sessions (Redis,
sliding TTL) and the Origin allow-list. Keys are never logged or stored outside the database
hash; sessions store only the key id and tenant. `Authenticator` is what front ends call: who
presents these credentials, and is that still so.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import TypeGuard

import redis.asyncio as aioredis

from gateway.errors import UNAUTHORIZED, GatewayError
from gateway.quota import Limits
from llmstream import apikeys

SESSION_COOKIE = "llmstream_session"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str
    limits: Limits


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    tenant_id: str
    key_sha256: bytes
    active: bool  # key not revoked and tenant not disabled
    limits: Limits
    # Unix time from which the key is refused (None: never). Checked against the wall clock
    # on every use, so a cached row does not outlive its key.
    expires_at: float | None = None


KEY_QUERY = """
SELECT k.id, k.tenant_id, k.key_sha256,
       (k.revoked_at IS NULL AND t.disabled_at IS NULL),
       q.name, q.requests_per_minute, q.tokens_per_day, q.tokens_per_month,
       q.max_concurrent_streams, q.max_tokens_per_request, q.max_sockets,
       extract(epoch FROM k.expires_at)::float8
FROM api_keys k JOIN tenants t ON t.id = k.tenant_id JOIN quota_tiers q ON q.name = t.tier
WHERE k.id = %s
"""

Lookup = Callable[[str], Awaitable[KeyRow | None]]


def pg_lookup(pool: object) -> Lookup:
    """Key row by id from a psycopg AsyncConnectionPool."""

    async def lookup(key_id: str) -> KeyRow | None:
        async with pool.connection() as conn:  # type: ignore[attr-defined]
            cur = await conn.execute(KEY_QUERY, (key_id,))
            row = await cur.fetchone()
        if row is None:
            return None
        return KeyRow(
            key_id=row[0],
            tenant_id=row[1],
            key_sha256=bytes(row[2]),
            active=bool(row[3]),
            limits=Limits(row[4], *(int(v) for v in row[5:11])),
            expires_at=None if row[11] is None else float(row[11]),
        )

    return lookup


class KeyCache:
    """Verified key rows by key id, kept `ttl_s` seconds: a revoked key is refused at most
    `ttl_s` later (on the next action of an open socket)."""

    def __init__(
        self,
        lookup: Lookup,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.lookup = lookup
        self.ttl_s = ttl_s
        self.clock = clock
        self.wall_clock = wall_clock
        self._rows: dict[str, tuple[float, KeyRow | None]] = {}

    async def row(self, key_id: str) -> KeyRow | None:
        now = self.clock()
        hit = self._rows.get(key_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        row = await self.lookup(key_id)
        if len(self._rows) > 100_000:
            self._rows.clear()
        self._rows[key_id] = (now, row)
        return row

    async def verify_key(self, key: str) -> Principal | None:
        """Principal of a presented key, or None (malformed, unknown, wrong secret, revoked)."""
        key_id = apikeys.key_id_of(key)
        if key_id is None:
            return None
        row = await self.row(key_id)
        if not self._usable(row) or not apikeys.matches(key, row.key_sha256):
            return None
        return Principal(row.tenant_id, row.key_id, row.limits)

    def _usable(self, row: KeyRow | None) -> TypeGuard[KeyRow]:
        """Not revoked, tenant not disabled, not expired."""
        if row is None or not row.active:
            return False
        return row.expires_at is None or self.wall_clock() < row.expires_at

    async def still_valid(self, principal: Principal) -> Principal | None:
        """Re-check an authenticated principal (revocation, tier change) through the cache."""
        row = await self.row(principal.key_id)
        if not self._usable(row) or row.tenant_id != principal.tenant_id:
            return None
        return Principal(row.tenant_id, row.key_id, row.limits)


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def cookie_value(cookie_header: str | None, name: str = SESSION_COOKIE) -> str | None:
    if not cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except Exception:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None and morsel.value else None


def origin_allowed(
    origin: str | None, allowed: list[str], host: str | None, tls: bool = False
) -> bool:
    """Browsers always send Origin on upgrades; clients that send none are not browsers (and
    authenticate with a bearer key). `*` allows any origin; an empty list allows only the
    gateway's own host: https only when the gateway serves TLS itself (behind a TLS proxy it
    sees plain requests from https pages, so both)."""
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    if not allowed and host:
        return origin == f"https://{host}" or (not tls and origin == f"http://{host}")
    return False


class Sessions:
    """Browser sessions: `gw:session:<sha256(id)>` -> "key_id tenant_id", sliding TTL."""

    def __init__(self, client: aioredis.Redis, ttl_s: int, prefix: str = "gw:session:"):
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix

    def _key(self, session_id: str) -> str:
        return self.prefix + hashlib.sha256(session_id.encode()).hexdigest()

    async def create(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        await self.client.set(
            self._key(session_id), f"{principal.key_id} {principal.tenant_id}", ex=self.ttl_s
        )
        return session_id

    async def lookup(self, session_id: str) -> tuple[str, str] | None:
        """(key_id, tenant_id) of a live session; refreshes its TTL."""
        if len(session_id) > 100:
            return None
        key = self._key(session_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.expire(key, self.ttl_s)
        value, _ = await pipe.execute()
        if not value:
            return None
        key_id, _, tenant_id = value.decode().partition(" ")
        return key_id, tenant_id

    async def delete(self, session_id: str) -> None:
        await self.client.delete(self._key(session_id))


class Authenticator:
    def __init__(self, keys: KeyCache, sessions: Sessions) -> None:
        self.keys = keys
        self.sessions = sessions

    async def principal(self, authorization: str | None, cookie: str | None) -> Principal | None:
        """The principal of a request's credentials: a bearer key, else a session cookie."""
        key = bearer(authorization)
        if key is not None:
            return await self.keys.verify_key(key)
        sid = cookie_value(cookie)
        found = await self.sessions.lookup(sid) if sid is not None else None
        if found is None:
            return None
        key_id, tenant_id = found
        # The key's row supplies the limits; these are never used.
        unknown = Limits("", 1, 1, 1, 1, 1, 1)
        return await self.keys.still_valid(Principal(tenant_id, key_id, unknown))

    async def recheck(self, principal: Principal, session_id: str | None) -> Principal:
        """Before each action of a long-lived connection: the principal as it is now (a tier
        may have changed), or `GatewayError` unauthorized if its key was revoked or expired,
        or the session it was opened with ended (the lookup slides the session, like any use)."""
        now = await self.keys.still_valid(principal)
        if now is None:
            raise GatewayError(UNAUTHORIZED, "API key revoked or expired")
        if session_id is not None:
            found = await self.sessions.lookup(session_id)
            if found is None or found[0] != now.key_id:
                raise GatewayError(UNAUTHORIZED, "session expired or signed out")
        return now


def session_id_of(authorization: str | None, cookie: str | None) -> str | None:
    """The browser session a connection lives by: its cookie's, unless a bearer key opened it."""
    return cookie_value(cookie) if bearer(authorization) is None else None


def set_cookie(session_id: str, max_age_s: int, secure: bool) -> str:
    parts = [
        f"{SESSION_COOKIE}={session_id}",
        "Path=/",
        "HttpOnly",
        "SameSite=Strict",
        f"Max-Age={max_age_s}",
    ]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def clear_cookie() -> str:
    return f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
