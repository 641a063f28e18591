"""Private Redis server from the Debian package (or an external one via LLMSTREAM_REDIS_URL).

Layout ($LLMSTREAM_STATE_DIR/redis/): redis.pid, redis.log, port (56379 upward, chosen once),
appendonlydir/, users.json (each user's password, 0600, generated once), users.acl (the ACL
file the server loads: SHA-256 of the passwords, 0600). Append-only file, fsync every second
(as docker-compose.yml runs it): Redis holds the quota counters and the gateways' request
metadata (resume), which a restart must not lose (`llmstream chaos` restarts it mid-stream); no
RDB snapshots.

Authentication: the `default` user is off (a client without credentials gets NOAUTH); a user
per service that uses Redis, limited to its keys and without the dangerous commands (FLUSHALL,
CONFIG, KEYS, DEBUG, SHUTDOWN...), and `admin` for tooling and tests (docs/security.md).
infra.json records a URL per user (`redis_urls`; `redis_url` is admin's). A server started
before authentication (no users.json when it was started) is reused as it is, without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from llmstream import config

from ._common import (
    ComponentStatus,
    InfraError,
    apt_install,
    component_dir,
    last_error_line,
    log_hint,
    one_line,
    owned_pid,
    pick_port,
    port_free_soon,
    read_int,
    read_text,
    record,
    rotate_log,
    run,
    running_state,
    startup_timeout,
    stop_recorded,
    write_text,
)

log = logging.getLogger("llmstream_tools.infra")

NAME = "redis"
FIRST_PORT = 56379
STOP_TIMEOUT_S = 15.0


def redis_dir() -> Path:
    return component_dir(NAME)


def pid_file() -> Path:
    return redis_dir() / "redis.pid"


def log_file() -> Path:
    return redis_dir() / "redis.log"


def port_file() -> Path:
    return redis_dir() / "port"


def external_url() -> str:
    return os.environ.get(config.PREFIX + "REDIS_URL", "").strip()


ADMIN = "admin"
# Who may do what: keys (`~pattern`), channels (`&`), commands (`+@category`, `-@category`).
# The gateway keeps sessions, request metadata, idempotency keys (gw:*) and admits against the
# quota counters (quota:*); the aggregator settles the quota counters. Neither may run what
# only an operator needs (@dangerous: FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN, ACL, ...).
RULES = {
    ADMIN: "~* &* +@all",
    "gateway": "~gw:* ~quota:* &* +@all -@dangerous",
    "aggregator": "~quota:* &* +@all -@dangerous",
}


def users_file() -> Path:
    return redis_dir() / "users.json"


def acl_file() -> Path:
    return redis_dir() / "users.acl"


def users() -> dict[str, str]:
    """user -> password: generated once (0600); a user added to RULES later gets one too."""
    text = read_text(users_file())
    found: dict[str, str] = json.loads(text) if text else {}
    missing = [u for u in RULES if u not in found]
    if missing:
        found.update({u: secrets.token_hex(24) for u in missing})
        write_text(users_file(), json.dumps(found, indent=2) + "\n", mode=0o600)
    return found


def write_acl_file(passwords: dict[str, str]) -> Path:
    """The server's ACL file: the default user off, every user with its rules and the SHA-256
    of its password (the file never holds a password)."""
    lines = ["user default off"] + [
        f"user {u} on #{hashlib.sha256(passwords[u].encode()).hexdigest()} {rules}"
        for u, rules in RULES.items()
    ]
    write_text(acl_file(), "\n".join(lines) + "\n", mode=0o600)
    return acl_file()


def url(port: int, user: str | None = None, password: str = "") -> str:
    """The server's URL, with a user's credentials when given."""
    if user is None:
        return f"redis://127.0.0.1:{port}/0"
    return f"redis://{user}:{password}@127.0.0.1:{port}/0"


def redact(redis_url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1@", redis_url)


def ping(redis_url: str, timeout_s: float = 2.0) -> str | None:
    """None if PING works, else the cause (one line)."""
    import redis

    try:
        client = redis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return one_line(f"{type(exc).__name__}: {exc}", 200)
    return None


def pid() -> int | None:
    return owned_pid(pid_file(), "redis-server")


def status() -> ComponentStatus:
    external = external_url()
    if external:
        error = ping(external)
        state = "running (external)" if error is None else "unreachable (external)"
        return ComponentStatus(NAME, redact(external), state, detail=error or "")
    port = read_int(port_file())
    address = url(port) if port else "(no port chosen yet)"
    server = pid()
    if server is None:
        return ComponentStatus(NAME, address, "stopped", log=str(log_file()))
    return ComponentStatus(NAME, address, running_state(server), server, str(log_file()))


def _wait_ping(redis_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    error = ping(redis_url, 1.0)
    while error is not None:
        if time.monotonic() > deadline:
            raise InfraError(
                NAME,
                f"redis-server did not answer PING on {redact(redis_url)} within {timeout:.0f} s "
                f"({error})",
                f"{log_hint(log_file())}; raise LLMSTREAM_STARTUP_TIMEOUT_S or fix the cause",
            )
        time.sleep(0.1)
        error = ping(redis_url, 1.0)


def up() -> ComponentStatus:
    external = external_url()
    if external:
        error = ping(external, min(startup_timeout(), 5.0))
        if error is not None:
            raise InfraError(
                NAME,
                f"LLMSTREAM_REDIS_URL={redact(external)} does not answer ({error})",
                "start that server, or unset LLMSTREAM_REDIS_URL so `llmstream infra up` starts "
                "a private one",
            )
        return ComponentStatus(NAME, redact(external), "running (external)")

    binary = shutil.which("redis-server")
    if binary is None:
        apt_install(NAME, "redis-server")
        binary = shutil.which("redis-server")
    if binary is None:
        raise InfraError(
            NAME,
            "redis-server not found after installing",
            "install it (apt-get install redis-server) or set LLMSTREAM_REDIS_URL",
        )
    port = pick_port(FIRST_PORT, port_file())
    passwords = users()
    redis_url = url(port, ADMIN, passwords[ADMIN])
    timeout = startup_timeout()
    if pid() is not None and ping(redis_url, 1.0) is not None and ping(url(port), 1.0) is None:
        # Started before authentication (no ACL file then): reused as it is until restarted.
        log.warning("redis: the running server has no users (started before authentication)")
        record(redis_url=url(port), redis_urls={})
        return status()
    if pid() is None:
        if not port_free_soon(port):
            raise InfraError(
                NAME,
                f"port {port} (remembered in {port_file()}) is in use by another program",
                f"stop that program, or delete {port_file()} so a free port is chosen",
            )
        rotate_log(log_file(), 16 * 1024 * 1024)
        log.info("redis: starting on 127.0.0.1:%d", port)
        result = run(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--daemonize",
                "yes",
                "--dir",
                str(redis_dir()),
                "--pidfile",
                str(pid_file()),
                "--aclfile",
                str(write_acl_file(passwords)),
                "--logfile",
                str(log_file()),
            ],
            30.0,
            cwd=redis_dir(),
        )
        if result.returncode != 0:
            raise InfraError(
                NAME,
                f"redis-server failed to start: {last_error_line(result.output)}",
                log_hint(log_file()),
            )
    _wait_ping(redis_url, timeout)
    # The daemon writes its pid file just after it starts listening.
    deadline = time.monotonic() + 5.0
    while pid() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid() is None:
        raise InfraError(
            NAME,
            f"a server answers on {redis_url} but {pid_file()} names no running redis-server",
            f"stop the program on port {port}, or delete {port_file()} so a free port is chosen",
        )
    record(
        redis_url=redis_url,
        redis_urls={u: url(port, u, passwords[u]) for u in RULES},
    )
    return status()


def stop(kill: bool = False) -> bool:
    return stop_recorded("redis", pid(), pid_file(), kill, STOP_TIMEOUT_S)
