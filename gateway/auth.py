"""Authentication: API keys (PostgreSQL, SHA-256, cached briefly), browser sessions (Redis,
sliding and absolute lifetime, values signed with a server secret) and the Origin allow-list.
Keys are never logged or stored outside the database hash; sessions store only the key id,
the tenant and their creation time. `Authenticator` is what front ends call: who presents
these credentials, and is that still so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TypeGuard

import redis.asyncio as aioredis

from gateway.errors import UNAUTHORIZED, GatewayError
from gateway.quota import Limits
from llmstream import apikeys, telemetry

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


class NegativeCache:
    """Presented keys known to be unusable (unknown id, wrong secret), by SHA-256 of the key
    (the key itself is never kept), for `ttl_s`; at most `size` entries, the oldest dropped
    first. Random well-formed keys then cost one PostgreSQL query each per `ttl_s` only while
    they are new, and a flood of distinct ones cannot grow memory past the bound."""

    def __init__(
        self, ttl_s: float, size: int = 10_000, clock: Callable[[], float] = time.monotonic
    ):
        self.ttl_s = ttl_s
        self.size = size
        self.clock = clock
        self._refused: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    def refused(self, key: str) -> bool:
        digest = self._digest(key)
        at = self._refused.get(digest)
        if at is None:
            return False
        if self.clock() - at >= self.ttl_s:
            del self._refused[digest]
            return False
        return True

    def add(self, key: str) -> None:
        digest = self._digest(key)
        self._refused.pop(digest, None)
        self._refused[digest] = self.clock()
        while len(self._refused) > self.size:
            self._refused.popitem(last=False)


# Unusable keys are remembered this long at most (a key created just after a failed try works
# within it), and this many at most.
NEGATIVE_TTL_S = 30.0
NEGATIVE_SIZE = 10_000


class KeyCache:
    """Verified key rows by key id, kept `ttl_s` seconds: a revoked key is refused at most
    `ttl_s` later (on the next action of an open socket). Keys that did not verify are
    remembered (`NegativeCache`) without a database query."""

    def __init__(
        self,
        lookup: Lookup,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        negative: NegativeCache | None = None,
    ):
        self.lookup = lookup
        self.ttl_s = ttl_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.negative = negative or NegativeCache(max(ttl_s, NEGATIVE_TTL_S), NEGATIVE_SIZE, clock)
        self._rows: dict[str, tuple[float, KeyRow | None]] = {}

    async def row(self, key_id: str) -> KeyRow | None:
        now = self.clock()
        hit = self._rows.get(key_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        row = await self.lookup(key_id)
        if len(self._rows) > 100_000:
            self._rows.clear()
        if row is not None:  # unknown ids are the negative cache's (bounded, by key hash)
            self._rows[key_id] = (now, row)
        return row

    async def verify_key(self, key: str) -> Principal | None:
        """Principal of a presented key, or None (malformed, unknown, wrong secret, revoked)."""
        key_id = apikeys.key_id_of(key)
        if key_id is None or self.negative.refused(key):
            return None
        row = await self.row(key_id)
        if row is None or not apikeys.matches(key, row.key_sha256):
            self.negative.add(key)
            return None
        if not self._usable(row):
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


# ---- browser sessions ---------------------------------------------------------------------

SECRET_BYTES = 32
REFUSED_LOG_EVERY_MS = 10_000
log = logging.getLogger("gateway")


class SessionSecretError(RuntimeError):
    """The session secret file is unusable (the message says why and where)."""


def read_secrets(path: Path) -> list[bytes]:
    """The session secrets of `path`: one per line, the first signs, all verify (rotation:
    docs/gateway.md). Created with one random secret, mode 0600, atomically (every replica
    of a host ends up with the same file) if it does not exist. Blocking: call off the loop."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: theirs is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    found = [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]
    if not found:
        raise SessionSecretError(f"session secret file {path} is empty")
    short = [i + 1 for i, k in enumerate(found) if len(k) < SECRET_BYTES]
    if short:
        raise SessionSecretError(
            f"session secret file {path}: line(s) {short} shorter than {SECRET_BYTES} characters"
        )
    return found


@dataclass(frozen=True)
class SessionValue:
    key_id: str
    tenant_id: str
    created_ms: int


def _mac(secret: bytes, record_key: str, key_id: str, tenant_id: str, created_ms: int) -> str:
    # Bound to the Redis key it is stored under: a valid value copied under another session's
    # key does not verify there.
    msg = f"{record_key}\n{key_id}\n{tenant_id}\n{created_ms}".encode()
    digest = hmac.new(secret, msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def seal_session(secret: bytes, record_key: str, value: SessionValue) -> str:
    """The Redis value of a session: "key_id tenant_id created_ms mac" (pure)."""
    mac = _mac(secret, record_key, value.key_id, value.tenant_id, value.created_ms)
    return f"{value.key_id} {value.tenant_id} {value.created_ms} {mac}"


def open_session(
    secrets_: Sequence[bytes], record_key: str, raw: str, now_ms: int, max_ms: int
) -> SessionValue | None:
    """The session a Redis value says, if one of `secrets_` signed it for `record_key` and it
    is younger than `max_ms`; else None (forged, moved, or past its absolute lifetime) (pure)."""
    parts = raw.split(" ")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    key_id, tenant_id, created, mac = parts
    value = SessionValue(key_id, tenant_id, int(created))
    if not any(
        hmac.compare_digest(mac, _mac(k, record_key, key_id, tenant_id, value.created_ms))
        for k in secrets_
    ):
        return None
    if not value.created_ms <= now_ms < value.created_ms + max_ms:
        return None
    return value


class Sessions:
    """Browser sessions: `gw:session:<sha256(id)>` -> a signed "key_id tenant_id created_ms
    mac" (`seal_session`); a sliding TTL (`ttl_s`, refreshed on use) within an absolute
    lifetime (`max_s` from sign-in). A value that does not verify under the server's secrets is
    refused like a missing one (and logged): writing Redis is not enough to mint a session."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_s: int,
        secrets_: Sequence[bytes],
        max_s: int,
        prefix: str = "gw:session:",
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ):
        self.client = client
        self.ttl_s = ttl_s
        self.secrets = list(secrets_)
        self.max_ms = max_s * 1000
        self.prefix = prefix
        self.clock_ms = clock_ms
        self._refused_count = 0
        self._refused_logged_ms = -REFUSED_LOG_EVERY_MS

    def _key(self, session_id: str) -> str:
        return self.prefix + hashlib.sha256(session_id.encode()).hexdigest()

    def _refused(self, now_ms: int, raw: str) -> None:
        """A session record that does not verify: forged (something wrote Redis), past its
        absolute lifetime, or signed by a replica with another secret file (every replica must
        read the same one). Refused, left in place (its TTL ends it), logged at most every
        REFUSED_LOG_EVERY_MS with the count since."""
        self._refused_count += 1
        if now_ms - self._refused_logged_ms < REFUSED_LOG_EVERY_MS:
            return
        fields = raw.split(" ")
        log.warning(
            "session refused: its value does not verify, or its lifetime ended",
            extra=telemetry.fields(
                refused=self._refused_count, signed_shape=len(fields) == 4 and fields[2].isdigit()
            ),
        )
        self._refused_logged_ms, self._refused_count = now_ms, 0

    def ttl_at(self, created_ms: int, now_ms: int) -> int:
        """The sliding TTL, cut at the absolute end (seconds, at least 1)."""
        left_ms = created_ms + self.max_ms - now_ms
        return max(1, min(self.ttl_s, left_ms // 1000))

    async def create(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        key, now = self._key(session_id), self.clock_ms()
        value = SessionValue(principal.key_id, principal.tenant_id, now)
        await self.client.set(
            key, seal_session(self.secrets[0], key, value), ex=self.ttl_at(now, now)
        )
        return session_id

    async def lookup(self, session_id: str) -> tuple[str, str] | None:
        """(key_id, tenant_id) of a live session; refreshes its TTL within its lifetime."""
        if len(session_id) > 100:
            return None
        key = self._key(session_id)
        raw = await self.client.get(key)
        if not raw:
            return None
        now = self.clock_ms()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        value = open_session(self.secrets, key, text, now, self.max_ms)
        if value is None:
            self._refused(now, text)
            return None
        await self.client.expire(key, self.ttl_at(value.created_ms, now))
        return value.key_id, value.tenant_id

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
