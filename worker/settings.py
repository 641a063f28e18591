"""The worker's settings (declarations; the CLI fills them from flags and LLMSTREAM_* variables).

Defaults of the tunables come from `llmstream.config`, the one place that documents them; the
fields without a variable are protocol constants, not knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmstream import config


def _int(name: str) -> int:
    return field(default_factory=lambda: config.get_int(name))


def _float(name: str) -> float:
    return field(default_factory=lambda: config.get_float(name))


@dataclass
class Settings:
    bootstrap: str
    prompts_topic: str
    tokens_topic: str
    dlq_topic: str
    group: str
    worker_id: str
    model_servers: list[str]
    max_inflight: int = _int("WORKER_MAX_INFLIGHT")
    coalesce_ms: float = _float("WORKER_COALESCE_MS")
    coalesce_bytes: int = _int("WORKER_COALESCE_BYTES")
    max_tokens: int = _int("WORKER_MAX_TOKENS")  # worker-side cap (0: none beyond the request's)
    default_timeout_ms: int = _int("WORKER_TIMEOUT_MS")
    retries: int = _int("WORKER_RETRIES")
    backoff_base_ms: float = _float("WORKER_BACKOFF_MS")
    drain_timeout_s: float = _float("WORKER_DRAIN_TIMEOUT_S")
    session_timeout_ms: int = _int("WORKER_SESSION_TIMEOUT_MS")
    blocklist: str = field(default_factory=lambda: config.get("WORKER_BLOCKLIST"))
    # PEM CA file of the model servers' TLS certificates ("system": the system store);
    # empty: plaintext gRPC.
    model_server_tls_ca: str = field(
        default_factory=lambda: config.get("WORKER_MODEL_SERVER_TLS_CA")
    )
    # The read-ahead window and its fair-share order (docs/scheduling.md).
    read_ahead: int = _int("WORKER_READ_AHEAD")
    read_ahead_bytes: int = _int("WORKER_READ_AHEAD_BYTES")
    aging_s: float = _float("WORKER_AGING_S")
    # Refuse submits beyond the tenant's tier (worker/tiers.py). Off for a worker built in
    # process (tests against tenants that only exist in their events); the CLI turns it on
    # unless LLMSTREAM_WORKER_TIER_CHECK=0.
    tier_check: bool = False
    database_url: str = ""  # PostgreSQL of the tiers (with tier_check)
    tier_cache_s: float = _float("WORKER_TIER_CACHE_S")
    tier_stale_s: float = _float("WORKER_TIER_STALE_S")
    backoff_cap_ms: float = 2000.0
    # Takeover reads the reply partition from this long before the submit's timestamp (clock
    # skew between gateway and broker).
    takeover_margin_ms: int = 60_000
    # After asking a model server to stop, how long its `finish` may take before the call is
    # cancelled.
    cancel_grace_s: float = 2.0
