"""Redis key layout of the quota counters, shared by the gateway (reserves) and the aggregator
(settles, rebuilds). One module so both sides can never disagree on a key name or a window.

Every key of a tenant carries the tenant id as a Redis Cluster hash tag (`{tenant}`), so all
keys one Lua script touches live in one slot. Windows are UTC calendar windows chosen from the
`submitted` event's `event_time` (the gateway stamps the event, then reserves in the windows of
that timestamp; the aggregator settles into the same windows from the same timestamp).

| Key | Type | Written by | Meaning |
|---|---|---|---|
| `quota:{T}:tokens:day:YYYYMMDD` | string (int) | gateway `INCRBY reserved`; aggregator `INCRBY used-reserved` | tokens of the day: reservations of running requests + usage of settled ones |
| `quota:{T}:tokens:month:YYYYMM` | string (int) | same | the same for the calendar month |
| `quota:{T}:requests:minute:YYYYMMDDHHMM` | string (int) | gateway `INCR` | admitted requests in that minute (rate limit) |
| `quota:{T}:streams` | sorted set | gateway `ZADD id lease_expiry_ms`; aggregator `ZREM id` | requests in flight; members past their lease are stale (`ZREMRANGEBYSCORE -inf now`) |
| `quota:{T}:settled:YYYYMMDD` | set | aggregator `SADD id` | request ids already settled (submit day): makes settlement idempotent |
| `quota:{T}:reservations` | sorted set | gateway `ZADD id submit_ms` (reserve), `ZREM id` (release); aggregator `ZREM id` (settle, reap) | reservations still counted in the token windows; score = the submit's `event_time` (ms), which picks their windows |
| `quota:{T}:reserved` | hash | same as `reservations` (`HSET id tokens` / `HDEL id`) | tokens each of those reservations added to the day and month counters: what a settlement, release or reap takes back (never an event's `reserved_tokens`) |

Each windowed key expires one day after its window ends (late settlements still land in an
existing key; nothing reads an old window after that). `reservations` and `reserved` are not
windowed: an entry lives from the reservation to its settlement, release or reap
(aggregator/reservation_reaper.py); both keys expire `RESERVATIONS_TTL_MS` after their last
write, so a tenant that stops using the service leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt

PREFIX = "quota"
# Keep a window's keys this long after the window ends.
GRACE_MS = 24 * 3600 * 1000
# Lease of an in-flight stream when the submit carries no timeout (rebuilds use it too).
DEFAULT_STREAM_LEASE_MS = 15 * 60 * 1000
# The reservation entries of a tenant outlive their last write this long (longer than a month
# window with its grace, so a settlement of a month-old request still finds its entry).
RESERVATIONS_TTL_MS = 40 * 24 * 3600 * 1000


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def day_id(ms: int) -> str:
    return _utc(ms).strftime("%Y%m%d")


def month_id(ms: int) -> str:
    return _utc(ms).strftime("%Y%m")


def minute_id(ms: int) -> str:
    return _utc(ms).strftime("%Y%m%d%H%M")


def day_start_ms(ms: int) -> int:
    t = _utc(ms)
    return _ms(t.replace(hour=0, minute=0, second=0, microsecond=0))


def day_end_ms(ms: int) -> int:
    """First millisecond of the next UTC day."""
    return _ms(_utc(day_start_ms(ms)) + dt.timedelta(days=1))


def month_start_ms(ms: int) -> int:
    t = _utc(ms)
    return _ms(t.replace(day=1, hour=0, minute=0, second=0, microsecond=0))


def month_end_ms(ms: int) -> int:
    """First millisecond of the next UTC month."""
    t = _utc(month_start_ms(ms))
    return _ms(
        t.replace(year=t.year + 1, month=1) if t.month == 12 else t.replace(month=t.month + 1)
    )


def minute_start_ms(ms: int) -> int:
    return ms - ms % 60_000


def _tenant(tenant_id: str) -> str:
    if not tenant_id or "{" in tenant_id or "}" in tenant_id:
        raise ValueError(f"unusable tenant id for a quota key: {tenant_id!r}")
    return f"{PREFIX}:{{{tenant_id}}}"


def tokens_day(tenant_id: str, ms: int) -> str:
    return f"{_tenant(tenant_id)}:tokens:day:{day_id(ms)}"


def tokens_month(tenant_id: str, ms: int) -> str:
    return f"{_tenant(tenant_id)}:tokens:month:{month_id(ms)}"


def requests_minute(tenant_id: str, ms: int) -> str:
    return f"{_tenant(tenant_id)}:requests:minute:{minute_id(ms)}"


def streams(tenant_id: str) -> str:
    return f"{_tenant(tenant_id)}:streams"


def settled(tenant_id: str, ms: int) -> str:
    return f"{_tenant(tenant_id)}:settled:{day_id(ms)}"


def reservations(tenant_id: str) -> str:
    return f"{_tenant(tenant_id)}:reservations"


def reserved(tenant_id: str) -> str:
    return f"{_tenant(tenant_id)}:reserved"


def expire_day_at_ms(ms: int) -> int:
    """Absolute expiry (PEXPIREAT) of the day-windowed keys of `ms`."""
    return day_end_ms(ms) + GRACE_MS


def expire_month_at_ms(ms: int) -> int:
    return month_end_ms(ms) + GRACE_MS


def expire_minute_at_ms(ms: int) -> int:
    return minute_start_ms(ms) + 2 * 60_000
