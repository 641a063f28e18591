"""Bounds on cheap frames that buy expensive work (no I/O).

- `TokenBucket`: `rate` per second, bursts of `burst`.
- `FrameLimits`: cancel and resume frames (and the OpenAI routes' cancel and resume) are
  rate-limited per socket and per tenant. A cancel is an acknowledged Kafka write; a resume
  holds a catch-up reader. Both are this replica's work, so the buckets are this replica's, in
  memory: a Redis round trip per frame would itself cost what is being limited. A tenant
  spread over `n` replicas gets at most `n` times its rate; the socket caps (per process and
  per tenant, in Redis) bound how many sockets can spread it.
- `ResumeSlots`: the concurrent catch-up readers of this replica (`GATEWAY_MAX_RESUMES`), of
  which one tenant may hold at most its share: slow resumes of one tenant cannot take the
  slots another tenant's resume needs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# Per socket: a client resuming after a reconnect sends one resume per stream it follows (the
# watches cap bounds them): a burst that size, then a few per second.
SOCKET_RATE = 10.0
SOCKET_BURST = 256
# Per tenant on one replica: its sockets together.
TENANT_RATE = 50.0
TENANT_BURST = 512
# Tenants with a bucket at most (least recently used dropped: a full bucket again).
MAX_TENANTS = 100_000
# A tenant holds at most this share of the resume slots (at least one slot).
TENANT_RESUME_SHARE = 0.25


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: int
    tokens: float = -1.0  # -1: full
    at: float = 0.0  # clock time of `tokens`

    def take(self, now: float) -> int:
        """Take one token: 0 if there was one, else how many ms until there is."""
        if self.tokens < 0:
            self.tokens, self.at = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - self.tokens) / self.rate * 1000))


@dataclass
class FrameLimits:
    """The per-tenant buckets of one replica; a socket brings its own (`socket_bucket`)."""

    clock: Callable[[], float]
    tenant_rate: float = TENANT_RATE
    tenant_burst: int = TENANT_BURST
    max_tenants: int = MAX_TENANTS
    _tenants: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)

    @staticmethod
    def socket_bucket() -> TokenBucket:
        return TokenBucket(SOCKET_RATE, SOCKET_BURST)

    def take(self, tenant_id: str, socket: TokenBucket | None = None) -> int:
        """0 if a frame of this socket (None: an HTTP request) and tenant may go now, else
        how many ms until it may. A refused frame takes nothing from the other bucket."""
        now = self.clock()
        bucket = self._tenants.pop(tenant_id, None) or TokenBucket(
            self.tenant_rate, self.tenant_burst
        )
        self._tenants[tenant_id] = bucket
        while len(self._tenants) > self.max_tenants:
            self._tenants.popitem(last=False)
        if socket is not None:
            wait = socket.take(now)
            if wait:
                return wait
        wait = bucket.take(now)
        if wait and socket is not None:
            socket.tokens += 1.0  # give the socket's token back
        return wait


@dataclass
class ResumeSlot:
    slots: ResumeSlots
    tenant_id: str
    released: bool = False

    def release(self) -> None:
        """Idempotent: the catch-up and its task's end may both call it."""
        if not self.released:
            self.released = True
            self.slots.release(self.tenant_id)


@dataclass
class ResumeSlots:
    total: int
    share: float = TENANT_RESUME_SHARE
    held: dict[str, int] = field(default_factory=dict)  # tenant -> slots it holds
    in_use: int = 0

    @property
    def per_tenant(self) -> int:
        return max(1, int(self.total * self.share))

    def take(self, tenant_id: str) -> ResumeSlot | None:
        """A slot for a catch-up of `tenant_id`, or None: all taken, or the tenant holds its
        share."""
        mine = self.held.get(tenant_id, 0)
        if mine >= self.per_tenant or self.in_use >= self.total:
            return None
        self.held[tenant_id] = mine + 1
        self.in_use += 1
        return ResumeSlot(self, tenant_id)

    def release(self, tenant_id: str) -> None:
        self.in_use -= 1
        left = self.held.get(tenant_id, 0) - 1
        if left > 0:
            self.held[tenant_id] = left
        else:
            self.held.pop(tenant_id, None)
