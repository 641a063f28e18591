"""Defence in depth, pure core: does a `submitted` event stay within its tenant's tier?

The gateway admits a request only within the tenant's tier (max_tokens capped, reservation =
estimated prompt tokens + max_tokens). Anything that can write the prompts topic could skip the
gateway, so the worker checks again before it spends a model on it (docs/worker.md, "Tier
check"): an unknown or disabled tenant, a `max_tokens` of 0 (unbounded) or above the tier's
`max_tokens_per_request`, a reservation that is not estimate + max_tokens, an estimate larger
than the prompt could give, or a fair-share weight above the tier's is refused with a terminal
`failed` event and never generated. The cache of tiers (`TierCache`) and what happens while
PostgreSQL is unreachable are decided here too; the lookup itself is `tier_lookup.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from llmstream.v1 import events_pb2

# Failure codes of RequestFailed (docs/events.md).
LIMIT_EXCEEDED = "limit_exceeded"
UNKNOWN_TENANT = "unknown_tenant"
TIER_UNAVAILABLE = "tier_unavailable"
# Chat template tokens the gateway's estimate adds per message (gateway/admission.py).
TEMPLATE_TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True)
class TenantTier:
    """What the worker checks a submit against: the tenant's row and its tier's."""

    tenant_id: str
    disabled: bool
    tier: str
    max_tokens_per_request: int
    share: int = 0  # the tier's fair-share weight (0: the tier table has none)


@dataclass(frozen=True)
class Refusal:
    """Why a submit is not run: the `failed` event's code and message (shown to the tenant)."""

    code: str
    message: str


def prompt_token_bound(submitted: events_pb2.RequestSubmitted) -> int:
    """The most prompt tokens the gateway's estimate can give for this prompt: at most one
    token per character (roles and contents), plus the chat template's tokens per message."""
    prompt = submitted.prompt
    kind = prompt.WhichOneof("kind")
    if kind == "chat":
        messages = prompt.chat.messages
        chars = sum(len(m.content) + len(m.role) for m in messages)
        return chars + 1 + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
    if kind == "tokens":
        return len(prompt.tokens.ids) + 1
    return len(prompt.text) + 1


def check_submit(submit: events_pb2.Event, tier: TenantTier | None) -> Refusal | None:
    """None: the submit is within its tenant's tier. `tier` None: no such tenant."""
    tenant = submit.tenant_id
    if tier is None:
        return Refusal(UNKNOWN_TENANT, f"tenant {tenant!r} does not exist")
    if tier.disabled:
        return Refusal(UNKNOWN_TENANT, f"tenant {tenant!r} is disabled")
    s = submit.submitted
    cap = tier.max_tokens_per_request
    if not 0 < s.max_tokens <= cap:
        return Refusal(
            LIMIT_EXCEEDED,
            f"max_tokens {s.max_tokens or 'unbounded'} exceeds the {tier.tier} tier's {cap}",
        )
    if s.reserved_tokens != s.estimated_prompt_tokens + s.max_tokens:
        return Refusal(
            LIMIT_EXCEEDED,
            f"reserved_tokens {s.reserved_tokens} is not estimated_prompt_tokens "
            f"{s.estimated_prompt_tokens} + max_tokens {s.max_tokens}",
        )
    bound = prompt_token_bound(s)
    if s.estimated_prompt_tokens > bound:
        return Refusal(
            LIMIT_EXCEEDED,
            f"estimated_prompt_tokens {s.estimated_prompt_tokens} exceeds what the prompt can "
            f"hold ({bound})",
        )
    if tier.share and s.share > tier.share:
        return Refusal(
            LIMIT_EXCEEDED, f"share {s.share} exceeds the {tier.tier} tier's {tier.share}"
        )
    return None


class Freshness(Enum):
    FRESH = "fresh"  # looked up within the TTL: use it
    STALE = "stale"  # older: ask PostgreSQL; if it cannot answer, still usable
    NONE = "none"  # nothing usable: ask PostgreSQL, wait for it


@dataclass(frozen=True)
class Cached:
    freshness: Freshness
    tier: TenantTier | None = None  # with FRESH/STALE; None there: no such tenant


class TierCache:
    """Tiers by tenant id (None: no such tenant), at most `max_entries` (least recently used
    go first). A tier is used as it is for `ttl_s`; after that it is looked up again, but
    while PostgreSQL cannot answer, it is still used up to `stale_s` old: tiers change
    rarely, and the gateway already admitted the request under the tier it knew. An unknown
    tenant is never used stale: a tenant created meanwhile must not wait for PostgreSQL."""

    def __init__(self, ttl_s: float, stale_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.stale_s = max(stale_s, ttl_s)
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, TenantTier | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tenant_id: str, now: float) -> Cached:
        hit = self._entries.get(tenant_id)
        if hit is None:
            return Cached(Freshness.NONE)
        at, tier = hit
        self._entries.move_to_end(tenant_id)
        age = now - at
        if age < self.ttl_s:
            return Cached(Freshness.FRESH, tier)
        if age < self.stale_s and tier is not None:
            return Cached(Freshness.STALE, tier)
        return Cached(Freshness.NONE)

    def put(self, tenant_id: str, tier: TenantTier | None, now: float) -> None:
        self._entries[tenant_id] = (now, tier)
        self._entries.move_to_end(tenant_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def retry_delay_s(failures: int, base_s: float = 0.25, cap_s: float = 5.0) -> float:
    """Wait before asking PostgreSQL again after `failures` failed lookups (from 1)."""
    return float(min(cap_s, base_s * 2 ** max(0, failures - 1)))
