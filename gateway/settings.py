"""Gateway settings from LLMSTREAM_* variables (llmstream/config.py documents each)."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from llmstream import config

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


# Settings field -> its LLMSTREAM_ variable. The defaults (documented in llmstream/config.py)
# and the values from the environment both come through this table, parsed by the type of the
# field's default (config.get_bool is strict: a typo is an error, not false).
VARIABLES = {
    "host": "GATEWAY_HOST",
    "port": "GATEWAY_PORT",
    "prompts_topic": "TOPIC_PROMPTS",
    "tokens_topic": "TOPIC_TOKENS",
    "models_topic": "TOPIC_MODELS",
    "replica_index": "GATEWAY_REPLICA_INDEX",
    "replicas": "GATEWAY_REPLICAS",
    "grace_s": "GATEWAY_GRACE_S",
    "send_buffer": "GATEWAY_SEND_BUFFER",
    "max_frame_bytes": "GATEWAY_MAX_FRAME_BYTES",
    "max_body_bytes": "GATEWAY_MAX_BODY_BYTES",
    "max_sockets": "GATEWAY_MAX_SOCKETS",
    "max_inflight": "GATEWAY_MAX_INFLIGHT",
    "shed_max_tokens": "GATEWAY_SHED_MAX_TOKENS",
    "max_prompt_lag": "GATEWAY_MAX_PROMPT_LAG",
    "worker_group": "WORKER_GROUP",
    "max_resumes": "GATEWAY_MAX_RESUMES",
    "heartbeat_s": "GATEWAY_HEARTBEAT_S",
    "auth_cache_s": "GATEWAY_AUTH_CACHE_S",
    "session_ttl_s": "GATEWAY_SESSION_TTL_S",
    "session_max_s": "GATEWAY_SESSION_MAX_S",
    "session_secret_file": "SESSION_SECRET_FILE",
    "metrics_port": "GATEWAY_METRICS_PORT",
    "cookie_secure": "GATEWAY_COOKIE_SECURE",
    "tls_cert": "GATEWAY_TLS_CERT",
    "tls_key": "GATEWAY_TLS_KEY",
    "drain_s": "GATEWAY_DRAIN_S",
    "default_model": "GATEWAY_DEFAULT_MODEL",
}
_READ: dict[type, Callable[[str], Any]] = {
    str: config.get,
    int: config.get_int,
    float: config.get_float,
    bool: config.get_bool,
}
_DOCUMENTED = {setting.name: setting.default for setting in config.SETTINGS}
T = TypeVar("T", str, int, float, bool)


def _default(field_name: str, kind: type[T]) -> T:
    """The documented default of a field's variable, as the field's type."""
    raw = _DOCUMENTED[VARIABLES[field_name]]
    if kind is bool:
        return config.parse_bool(raw, config.PREFIX + VARIABLES[field_name])
    return kind(raw)


# How often the workers' prompt lag is read (only with GATEWAY_MAX_PROMPT_LAG; tests shorten it).
LAG_INTERVAL_S = 1.0


@dataclass
class Settings:
    gateway_id: str = ""  # empty: gateway-<host>-<pid>
    host: str = _default("host", str)
    port: int = _default("port", int)
    bootstrap: str = _DOCUMENTED["KAFKA_BOOTSTRAP"]
    prompts_topic: str = _default("prompts_topic", str)
    tokens_topic: str = _default("tokens_topic", str)
    models_topic: str = _default("models_topic", str)  # the model catalog (gateway/models.py)
    partitions: list[int] | None = None  # None: split_partitions(replica_index, replicas)
    replica_index: int = _default("replica_index", int)
    replicas: int = _default("replicas", int)
    origins: list[str] = field(default_factory=list)
    grace_s: float = _default("grace_s", float)
    send_buffer: int = _default("send_buffer", int)
    max_frame_bytes: int = _default("max_frame_bytes", int)
    max_body_bytes: int = _default("max_body_bytes", int)
    max_sockets: int = _default("max_sockets", int)
    max_inflight: int = _default("max_inflight", int)
    shed_max_tokens: int = _default("shed_max_tokens", int)
    max_prompt_lag: int = _default("max_prompt_lag", int)
    worker_group: str = _default("worker_group", str)
    lag_interval_s: float = LAG_INTERVAL_S
    max_resumes: int = _default("max_resumes", int)
    heartbeat_s: float = _default("heartbeat_s", float)
    auth_cache_s: float = _default("auth_cache_s", float)
    session_ttl_s: int = _default("session_ttl_s", int)
    session_max_s: int = _default("session_max_s", int)
    session_secret_file: str = _default("session_secret_file", str)  # empty: in the state dir
    # /metrics on its own port (0: none); the public port never serves it.
    metrics_port: int = _default("metrics_port", int)
    cookie_secure: bool = _default("cookie_secure", bool)  # also implied by serving TLS
    tls_cert: str = _default("tls_cert", str)  # PEM files: serve https/wss
    tls_key: str = _default("tls_key", str)
    drain_s: float = _default("drain_s", float)
    default_model: str = _default("default_model", str)
    redis_url: str = ""
    database_url: str = ""
    static_dir: Path = STATIC_DIR

    def __post_init__(self) -> None:
        if not self.gateway_id:
            self.gateway_id = f"gateway-{socket.gethostname()}-{os.getpid()}"

    def session_secret_path(self) -> Path:
        """Where the session secrets are (created there on first use when missing)."""
        if self.session_secret_file:
            return Path(self.session_secret_file)
        return config.state_dir() / "session-secret"

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
        values = {
            f.name: _READ[type(f.default)](VARIABLES[f.name])
            for f in fields(cls)
            if f.name in VARIABLES
        }
        spec = config.get("GATEWAY_PARTITIONS").strip()
        try:
            partitions = parse_partitions(spec) if spec else None
        except ValueError as exc:
            raise config.ConfigError(f"{config.PREFIX}GATEWAY_PARTITIONS: {exc}") from None
        if bool(values["tls_cert"]) != bool(values["tls_key"]):
            raise config.ConfigError(
                f"set both {config.PREFIX}GATEWAY_TLS_CERT and {config.PREFIX}GATEWAY_TLS_KEY"
            )
        return cls(
            gateway_id=config.get("GATEWAY_ID"),
            bootstrap=config.kafka_bootstrap(),
            partitions=partitions,
            origins=[o.strip() for o in config.get("GATEWAY_ORIGINS").split(",") if o.strip()],
            redis_url=config.redis_url(),
            database_url=config.database_url(),
            **values,
        )
