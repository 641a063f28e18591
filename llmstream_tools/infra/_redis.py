"""Private Redis server from the Debian package (or an external one via LLMSTREAM_REDIS_URL).

Layout ($LLMSTREAM_STATE_DIR/redis/): redis.pid, redis.log, port (56379 upward, chosen once),
appendonlydir/. Append-only file, fsync every second (as docker-compose.yml runs it): Redis
holds the quota counters and the gateways' request metadata (resume), which a restart must not
lose (`llmstream chaos` restarts it mid-stream); no RDB snapshots.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from llmstream import config

from ._common import (
    ComponentStatus,
    InfraError,
    apt_install,
    component_dir,
    kill_hard,
    last_error_line,
    log_hint,
    one_line,
    owned_pid,
    pick_port,
    port_free_soon,
    read_int,
    record,
    rotate_log,
    run,
    running_state,
    startup_timeout,
    terminate,
    wait_dead,
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


def url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


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
        return ComponentStatus(NAME, external, state, detail=error or "")
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
                f"redis-server did not answer PING on {redis_url} within {timeout:.0f} s ({error})",
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
                f"LLMSTREAM_REDIS_URL={external} does not answer ({error})",
                "start that server, or unset LLMSTREAM_REDIS_URL so `llmstream infra up` starts "
                "a private one",
            )
        return ComponentStatus(NAME, external, "running (external)")

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
    redis_url = url(port)
    timeout = startup_timeout()
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
    record(redis_url=redis_url)
    return status()


def stop(kill: bool = False) -> bool:
    server = pid()
    if server is None:
        return False
    if kill:
        kill_hard(server)
        wait_dead(server, 10.0)
    else:
        terminate(server, STOP_TIMEOUT_S)
    with contextlib.suppress(FileNotFoundError):
        pid_file().unlink()
    log.info("redis: stopped pid %d", server)
    return True
