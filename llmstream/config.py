"""Configuration: every knob is an ``LLMSTREAM_*`` environment variable.

``SETTINGS`` (llmstream/variables.py) is the single list of variables; the README table and
``llmstream config`` are printed from it, so documentation cannot drift from the code. Here:
reading them, the addresses and credentials `llmstream infra up` records, and who this process
is to Kafka and Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstream.variables import PREFIX as PREFIX
from llmstream.variables import SETTINGS as SETTINGS
from llmstream.variables import Setting as Setting

_BY_NAME = {s.name: s for s in SETTINGS}


def get(name: str) -> str:
    """Value of ``LLMSTREAM_<name>`` or its documented default."""
    setting = _BY_NAME[name]
    return os.environ.get(setting.env, setting.default)


def get_int(name: str) -> int:
    raw = get(name)
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not an integer") from None


def get_float(name: str) -> float:
    raw = get(name)
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not a number") from None


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_bool(raw: str, what: str) -> bool:
    """`1/true/yes/on` or `0/false/no/off/(empty)`, any case; anything else is an error (a typo
    must not silently mean false)."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{what}={raw!r} is not a boolean: use 1/true/yes/on or 0/false/no/off")


def get_bool(name: str) -> bool:
    return parse_bool(get(name), PREFIX + name)


class ConfigError(RuntimeError):
    """A configuration value is unusable; the message names the variable."""


def state_dir() -> Path:
    return Path(get("STATE_DIR"))


def cache_dir() -> Path:
    return Path(get("CACHE_DIR"))


def _infra_record() -> dict[str, Any]:
    """Addresses and credentials recorded by `llmstream infra up` for servers it started
    itself (infra.json, mode 0600)."""
    path = state_dir() / "infra.json"
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_str(key: str) -> str:
    value = _infra_record().get(key, "")
    return value if isinstance(value, str) else ""


# -- who this process is ------------------------------------------------------------------------

ADMIN = "admin"
_declared: list[str] = []


@contextlib.contextmanager
def acting_as(name: str) -> Iterator[None]:
    """While a service runs (`llmstream gateway|worker|...`), this process is that service:
    run by hand, it authenticates as itself with the credentials of the infra record. Restored
    afterwards (a `--help` in a test process must not leave it behind)."""
    previous = list(_declared)
    _declared[:] = [name]
    try:
        yield
    finally:
        _declared[:] = previous


def principal() -> str:
    """`LLMSTREAM_PRINCIPAL`, else what the running service declared, else `admin` (tooling,
    tests)."""
    return get("PRINCIPAL").strip() or (_declared[0] if _declared else ADMIN)


def database_url() -> str:
    url = get("DATABASE_URL") or _record_str("database_url")
    if not url:
        raise ConfigError(
            f"no PostgreSQL: set {PREFIX}DATABASE_URL or run `llmstream infra up` first"
        )
    return url


def _principal_entry(key: str, who: str | None, what: str, instead: str) -> tuple[str, str] | None:
    """(principal, secret) from the infra record's `key` map for `who` (default: this process's
    principal); None when the record keeps no such map; an error naming the known users when it
    keeps one without this principal."""
    entries = _infra_record().get(key)
    if not (isinstance(entries, dict) and entries):
        return None
    name = who or principal()
    found = entries.get(name)
    if not isinstance(found, str):
        raise ConfigError(
            f"{what} has no user for principal {name!r} (users: "
            f"{', '.join(sorted(entries))}): set {PREFIX}PRINCIPAL or {instead}"
        )
    return name, found


def redis_url(who: str | None = None) -> str:
    """`LLMSTREAM_REDIS_URL`, else the URL (with user and password) the infra record keeps for
    `who` (default: this process's principal)."""
    url = get("REDIS_URL")
    if url:
        return url
    entry = _principal_entry("redis_urls", who, "the local Redis", f"{PREFIX}REDIS_URL")
    if entry is not None:
        return entry[1]
    url = _record_str("redis_url")
    if not url:
        raise ConfigError(f"no Redis: set {PREFIX}REDIS_URL or run `llmstream infra up` first")
    return url


KAFKA_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True)
class KafkaAuth:
    """How this process authenticates to Kafka."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    username: str = ""
    password: str = field(default="", repr=False)


def kafka_auth(who: str | None = None) -> KafkaAuth:
    """`LLMSTREAM_KAFKA_USERNAME`/`PASSWORD` if set, else the user the infra record keeps for
    `who` (default: this process's principal); no credentials (an infra started before Kafka
    had authentication, or an external cluster without it): PLAINTEXT."""
    username, password = get("KAFKA_USERNAME").strip(), get("KAFKA_PASSWORD")
    mechanism = get("KAFKA_SASL_MECHANISM").strip()
    if username:
        if not password:
            raise ConfigError(
                f"{PREFIX}KAFKA_USERNAME={username} is set but no {PREFIX}KAFKA_PASSWORD"
            )
    else:
        entry = _principal_entry(
            "kafka_users",
            who,
            "the local Kafka requires authentication and",
            f"{PREFIX}KAFKA_USERNAME/PASSWORD",
        )
        if entry is not None:
            username, password = entry
            mechanism = _record_str("kafka_sasl_mechanism") or mechanism
    protocol = get("KAFKA_SECURITY_PROTOCOL").strip().upper()
    protocol = protocol or ("SASL_PLAINTEXT" if username else "PLAINTEXT")
    if protocol not in KAFKA_PROTOCOLS:
        raise ConfigError(
            f"{PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} is not one of {', '.join(KAFKA_PROTOCOLS)}"
        )
    if protocol == "PLAINTEXT":
        return KafkaAuth()
    if not username:
        raise ConfigError(
            f"{PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} needs {PREFIX}KAFKA_USERNAME and "
            f"{PREFIX}KAFKA_PASSWORD"
        )
    if mechanism not in KAFKA_MECHANISMS:
        raise ConfigError(
            f"{PREFIX}KAFKA_SASL_MECHANISM={mechanism} is not one of {', '.join(KAFKA_MECHANISMS)}"
        )
    return KafkaAuth(protocol, mechanism, username, password)


def kafka_bootstrap() -> str:
    explicit = os.environ.get(PREFIX + "KAFKA_BOOTSTRAP", "").strip()
    return explicit or f"127.0.0.1:{get_int('KAFKA_PORT')}"


def model_servers() -> list[str]:
    return [s.strip() for s in get("MODEL_SERVERS").split(",") if s.strip()]


def markdown_table() -> str:
    """The configuration table that README.md embeds (a test keeps them in sync)."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = s.default
        if s.name == "STATE_DIR":
            default = "$XDG_STATE_HOME/llmstream (~/.local/state/llmstream)"
        elif s.name == "CACHE_DIR":
            default = "$XDG_CACHE_HOME/llmstream (~/.cache/llmstream)"
        rows.append(
            f"| `{s.env}` | `{default}` | {s.help} |"
            if default
            else f"| `{s.env}` | (empty) | {s.help} |"
        )
    return "\n".join(rows)


README_START = "<!-- config-table:start -->\n"
README_END = "<!-- config-table:end -->"


def readme_table(readme: str) -> str:
    """The configuration table as it stands in README text."""
    start = readme.index(README_START) + len(README_START)
    return readme[start : readme.index(README_END)].strip()


def with_readme_table(readme: str) -> str:
    """README text with its configuration table replaced by the current one."""
    start = readme.index(README_START) + len(README_START)
    return readme[:start] + markdown_table() + "\n" + readme[readme.index(README_END) :]
