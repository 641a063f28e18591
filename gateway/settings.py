"""Gateway settings from LLMSTREAM_* variables (llmstream/config.py documents each)."""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from llmstream import config, topics

STATIC_DIR = Path(__file__).resolve().parent / "static"


def parse_partitions(spec: str) -> list[int]:
    """`0-5`, `0,2,4`, `0-2,7` -> sorted partition numbers; ValueError names the bad part."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"bad partition range {part!r} (use e.g. 0-5 or 0,2,4)") from None
        if a < 0 or b < a:
            raise ValueError(f"bad partition range {part!r} (use e.g. 0-5 or 0,2,4)")
        out.update(range(a, b + 1))
    return sorted(out)


def split_partitions(count: int, index: int, replicas: int) -> list[int]:
    """Partitions of replica `index` of `replicas` when `count` partitions are split evenly
    (contiguous ranges, the first ones one larger)."""
    if replicas < 1 or not 0 <= index < replicas:
        raise ValueError(f"replica index {index} is not in 0..{replicas - 1}")
    if count < replicas:
        raise ValueError(f"{replicas} replicas need at least {replicas} partitions, have {count}")
    base, extra = divmod(count, replicas)
    start = index * base + min(index, extra)
    return list(range(start, start + base + (1 if index < extra else 0)))


# Every default is the documented one in llmstream/config.py; Settings(...) built in-process
# (tests, benchmarks) gets the same values as the environment's defaults.
_DEFAULTS = {setting.name: setting.default for setting in config.SETTINGS}


def _default_int(name: str) -> int:
    return int(_DEFAULTS[name])


def _default_float(name: str) -> float:
    return float(_DEFAULTS[name])


# How often the workers' prompt lag is read (only with GATEWAY_MAX_PROMPT_LAG; tests shorten it).
LAG_INTERVAL_S = 1.0


@dataclass
class Settings:
    gateway_id: str = ""  # empty: gateway-<host>-<pid>
    host: str = _DEFAULTS["GATEWAY_HOST"]
    port: int = _default_int("GATEWAY_PORT")
    bootstrap: str = _DEFAULTS["KAFKA_BOOTSTRAP"]
    prompts_topic: str = _DEFAULTS["TOPIC_PROMPTS"]
    tokens_topic: str = _DEFAULTS["TOPIC_TOKENS"]
    partitions: list[int] | None = None  # None: split_partitions(replica_index, replicas)
    replica_index: int = _default_int("GATEWAY_REPLICA_INDEX")
    replicas: int = _default_int("GATEWAY_REPLICAS")
    origins: list[str] = field(default_factory=list)
    grace_s: float = _default_float("GATEWAY_GRACE_S")
    send_buffer: int = _default_int("GATEWAY_SEND_BUFFER")
    max_frame_bytes: int = _default_int("GATEWAY_MAX_FRAME_BYTES")
    max_sockets: int = _default_int("GATEWAY_MAX_SOCKETS")
    max_inflight: int = _default_int("GATEWAY_MAX_INFLIGHT")
    shed_max_tokens: int = _default_int("GATEWAY_SHED_MAX_TOKENS")
    max_prompt_lag: int = _default_int("GATEWAY_MAX_PROMPT_LAG")
    worker_group: str = _DEFAULTS["WORKER_GROUP"]
    lag_interval_s: float = LAG_INTERVAL_S
    max_resumes: int = _default_int("GATEWAY_MAX_RESUMES")
    heartbeat_s: float = _default_float("GATEWAY_HEARTBEAT_S")
    auth_cache_s: float = _default_float("GATEWAY_AUTH_CACHE_S")
    session_ttl_s: int = _default_int("GATEWAY_SESSION_TTL_S")
    # Also implied by serving TLS (tls_cert).
    cookie_secure: bool = config.parse_bool(
        _DEFAULTS["GATEWAY_COOKIE_SECURE"], config.PREFIX + "GATEWAY_COOKIE_SECURE"
    )
    tls_cert: str = _DEFAULTS["GATEWAY_TLS_CERT"]  # PEM files: serve https/wss
    tls_key: str = _DEFAULTS["GATEWAY_TLS_KEY"]
    drain_s: float = _default_float("GATEWAY_DRAIN_S")
    default_model: str = _DEFAULTS["GATEWAY_DEFAULT_MODEL"]
    redis_url: str = ""
    database_url: str = ""
    static_dir: Path = STATIC_DIR

    def __post_init__(self) -> None:
        if not self.gateway_id:
            self.gateway_id = f"gateway-{socket.gethostname()}-{os.getpid()}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS server context (https/wss), or None to serve plain http/ws."""
        if not self.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
        return ctx

    def owned_partitions(self, count: int) -> list[int]:
        """This replica's partitions of the tokens topic, which has `count`."""
        owned = (
            sorted(p for p in self.partitions if p < count)
            if self.partitions is not None
            else split_partitions(count, self.replica_index, self.replicas)
        )
        if not owned:
            raise RuntimeError(
                f"no partitions of {self.tokens_topic} ({count}) owned by {self.gateway_id}"
            )
        return owned

    @classmethod
    def from_env(cls) -> Settings:
        spec = config.get("GATEWAY_PARTITIONS").strip()
        try:
            partitions = parse_partitions(spec) if spec else None
        except ValueError as exc:
            raise config.ConfigError(f"{config.PREFIX}GATEWAY_PARTITIONS: {exc}") from None
        tls_cert, tls_key = config.get("GATEWAY_TLS_CERT"), config.get("GATEWAY_TLS_KEY")
        if bool(tls_cert) != bool(tls_key):
            raise config.ConfigError(
                f"set both {config.PREFIX}GATEWAY_TLS_CERT and {config.PREFIX}GATEWAY_TLS_KEY"
            )
        return cls(
            gateway_id=config.get("GATEWAY_ID"),
            host=config.get("GATEWAY_HOST"),
            port=config.get_int("GATEWAY_PORT"),
            bootstrap=config.kafka_bootstrap(),
            prompts_topic=topics.prompts(),
            tokens_topic=topics.tokens(),
            partitions=partitions,
            replica_index=config.get_int("GATEWAY_REPLICA_INDEX"),
            replicas=config.get_int("GATEWAY_REPLICAS"),
            origins=[o.strip() for o in config.get("GATEWAY_ORIGINS").split(",") if o.strip()],
            grace_s=config.get_float("GATEWAY_GRACE_S"),
            send_buffer=config.get_int("GATEWAY_SEND_BUFFER"),
            max_frame_bytes=config.get_int("GATEWAY_MAX_FRAME_BYTES"),
            max_sockets=config.get_int("GATEWAY_MAX_SOCKETS"),
            max_inflight=config.get_int("GATEWAY_MAX_INFLIGHT"),
            shed_max_tokens=config.get_int("GATEWAY_SHED_MAX_TOKENS"),
            max_prompt_lag=config.get_int("GATEWAY_MAX_PROMPT_LAG"),
            worker_group=config.get("WORKER_GROUP"),
            max_resumes=config.get_int("GATEWAY_MAX_RESUMES"),
            heartbeat_s=config.get_float("GATEWAY_HEARTBEAT_S"),
            auth_cache_s=config.get_float("GATEWAY_AUTH_CACHE_S"),
            session_ttl_s=config.get_int("GATEWAY_SESSION_TTL_S"),
            cookie_secure=config.get_bool("GATEWAY_COOKIE_SECURE"),
            tls_cert=tls_cert,
            tls_key=tls_key,
            drain_s=config.get_float("GATEWAY_DRAIN_S"),
            default_model=config.get("GATEWAY_DEFAULT_MODEL"),
            redis_url=config.redis_url(),
            database_url=config.database_url(),
        )
