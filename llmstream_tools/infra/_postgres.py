"""Private PostgreSQL server from the Debian packages (or an external one via DATABASE_URL).

Layout ($LLMSTREAM_STATE_DIR/postgres/):
  data/            cluster (owned by the `postgres` OS user when run as root); postmaster.pid inside
  run/             unix socket directory
  postgres.log     server log (pg_ctl -l)
  port             TCP port chosen the first time (55432 upward)
  password         password of the `llmstream` role (0600)

Authentication: TCP on 127.0.0.1 only, scram-sha-256 with a generated password for role
`llmstream` (owner of database `llmstream`, CREATEDB); the unix socket uses peer auth and is
only used by `infra` itself for administration as the superuser. The role's password is set as
a SCRAM verifier computed here: the password never appears on a psql command line.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import stat
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
    pick_port,
    pid_alive,
    port_free_soon,
    read_int,
    read_text,
    record,
    run,
    running_state,
    startup_timeout,
    terminate,
    wait_dead,
    write_text,
)

log = logging.getLogger("llmstream_tools.infra")

NAME = "postgres"
ROLE = "llmstream"
DATABASE = "llmstream"
FIRST_PORT = 55432
STOP_TIMEOUT_S = 30.0


def pg_dir() -> Path:
    return component_dir(NAME)


def data_dir() -> Path:
    return pg_dir() / "data"


def socket_dir() -> Path:
    return pg_dir() / "run"


def log_file() -> Path:
    return pg_dir() / "postgres.log"


def port_file() -> Path:
    return pg_dir() / "port"


def _as_root() -> bool:
    return os.geteuid() == 0


def _superuser() -> str:
    return "postgres" if _as_root() else getpass.getuser()


def external_url() -> str:
    return os.environ.get(config.PREFIX + "DATABASE_URL", "").strip()


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1@", url)


def check(url: str, timeout_s: float = 5.0) -> str | None:
    """None if `select 1` works on url, else the cause (one line)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(int(timeout_s), 1)) as conn:
            conn.execute("select 1").fetchone()
    except Exception as exc:
        return one_line(f"{type(exc).__name__}: {exc}", 200)
    return None


# --------------------------------------------------------------------------- binaries


def bin_dir() -> Path | None:
    """Newest /usr/lib/postgresql/<N>/bin with pg_ctl, else the directory of pg_ctl on PATH."""
    candidates = []
    for ctl in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"):
        version = ctl.parent.parent.name
        if version.isdigit():
            candidates.append((int(version), ctl.parent))
    if candidates:
        return max(candidates)[1]
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).resolve().parent / "initdb").exists():
        return Path(on_path).resolve().parent
    return None


def ensure_binaries() -> Path:
    found = bin_dir()
    if found is None:
        apt_install(NAME, "postgresql")
        found = bin_dir()
    if found is None:
        raise InfraError(
            NAME,
            "PostgreSQL server binaries not found after installing (no /usr/lib/postgresql/N/bin)",
            "install postgresql (apt-get install postgresql) or set LLMSTREAM_DATABASE_URL",
        )
    return found


def _as_pg(cmd: list[str]) -> list[str]:
    if not _as_root():
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _pg_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise InfraError(
            NAME,
            "there is no `postgres` OS user to run the server (it refuses to run as root)",
            "install the Debian package (apt-get install postgresql), which creates it",
        ) from None
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> None:
    """Give `others` search (x) permission on path and its parents so `postgres` can reach it."""
    for folder in [path, *path.parents]:
        try:
            mode = folder.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            log.info("postgres: chmod o+x %s so the postgres user can reach its data", folder)
            os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)


def _prepare_dirs() -> None:
    data, sock = data_dir(), socket_dir()
    data.mkdir(parents=True, exist_ok=True)
    sock.mkdir(parents=True, exist_ok=True)
    log_file().touch()
    os.chmod(data, 0o700)
    if _as_root():
        uid, gid = _pg_ids()
        _make_traversable(pg_dir())
        for path in (data, sock, log_file()):
            if path.stat().st_uid != uid:
                os.chown(path, uid, gid)


def _data_version() -> str | None:
    return read_text(data_dir() / "PG_VERSION")


def ensure_initdb(bins: Path) -> None:
    existing = _data_version()
    version = bins.parent.name
    if existing is not None:
        if version.isdigit() and existing != version:
            raise InfraError(
                NAME,
                f"{data_dir()} was created by PostgreSQL {existing} but the binaries are {version}",
                f"install postgresql-{existing}, or delete {data_dir()} (loses its data)",
            )
        return
    log.info("postgres: initdb %s", data_dir())
    result = run(
        _as_pg(
            [
                str(bins / "initdb"),
                "-D",
                str(data_dir()),
                "-U",
                _superuser(),
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
            ]
        ),
        120.0,
        cwd=pg_dir(),
    )
    if result.returncode != 0:
        raise InfraError(
            NAME,
            f"initdb {data_dir()} failed: {last_error_line(result.output)}",
            f"delete {data_dir()} and retry",
        )


# --------------------------------------------------------------------------- state


def pid() -> int | None:
    """Pid of the postmaster running on our data dir (from data/postmaster.pid), if alive."""
    pid_path = data_dir() / "postmaster.pid"
    value = read_int(pid_path)
    if value is None or not pid_alive(value):
        return None
    try:
        cmd = Path(f"/proc/{value}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return None
    return value if cmd.endswith((b"postgres", b"postmaster")) else None


def _password() -> str:
    path = pg_dir() / "password"
    value = read_text(path)
    if not value:
        value = secrets.token_hex(16)
        write_text(path, value + "\n", mode=0o600)
    return value


def url(port: int) -> str:
    return f"postgresql://{ROLE}:{_password()}@127.0.0.1:{port}/{DATABASE}"


def status() -> ComponentStatus:
    external = external_url()
    if external:
        error = check(external, 3.0)
        state = "running (external)" if error is None else "unreachable (external)"
        return ComponentStatus(NAME, redact(external), state, detail=error or "")
    port = read_int(port_file())
    address = redact(url(port)) if port else "(no port chosen yet)"
    postmaster = pid()
    if postmaster is None:
        return ComponentStatus(NAME, address, "stopped", log=str(log_file()))
    detail = f"PostgreSQL {_data_version()}, data {data_dir()}"
    return ComponentStatus(
        NAME, address, running_state(postmaster), postmaster, str(log_file()), detail
    )


def _psql(bins: Path, port: int, sql: str) -> str:
    result = run(
        _as_pg(
            [
                str(bins / "psql"),
                "-h",
                str(socket_dir()),
                "-p",
                str(port),
                "-U",
                _superuser(),
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qtAc",
                sql,
            ]
        ),
        30.0,
        cwd=pg_dir(),
    )
    if result.returncode != 0:
        raise InfraError(
            NAME,
            f"psql failed: {last_error_line(result.output)}",
            f"{log_hint(log_file())}",
        )
    return result.output.strip()


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for a scram-sha-256 password (RFC 5802/7677), computed here so
    the password itself never reaches a command line or the server: the role is created with
    this verifier, as psql's `\\password` does."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _ensure_role_and_database(bins: Path, port: int) -> None:
    password = scram_verifier(_password())  # base64 and $ : safe inside a SQL literal
    _psql(
        bins,
        port,
        "DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN "
        f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}'; "
        f"ELSE ALTER ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}'; END IF; END $$;",
    )
    # `DROP DATABASE ... WITH (FORCE)` (test and benchmark databases) must be able to end an
    # autovacuum worker, which runs as the superuser.
    _psql(bins, port, f"GRANT pg_signal_backend TO {ROLE}")
    if _psql(bins, port, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
        _psql(bins, port, f"CREATE DATABASE {DATABASE} OWNER {ROLE}")


def up() -> ComponentStatus:
    external = external_url()
    if external:
        error = check(external, min(startup_timeout(), 10.0))
        if error is not None:
            raise InfraError(
                NAME,
                f"LLMSTREAM_DATABASE_URL={redact(external)} does not answer ({error})",
                "start that server, or unset LLMSTREAM_DATABASE_URL so `llmstream infra up` "
                "starts a private one",
            )
        return ComponentStatus(NAME, redact(external), "running (external)")

    bins = ensure_binaries()
    port = pick_port(FIRST_PORT, port_file())
    timeout = startup_timeout()
    if pid() is None:
        if not port_free_soon(port):
            raise InfraError(
                NAME,
                f"port {port} (remembered in {port_file()}) is in use by another program",
                f"stop that program, or delete {port_file()} so a free port is chosen",
            )
        _prepare_dirs()
        ensure_initdb(bins)
        options = f"-p {port} -k {shlex.quote(str(socket_dir()))} -c listen_addresses=127.0.0.1"
        log.info("postgres: starting on 127.0.0.1:%d (data %s)", port, data_dir())
        result = run(
            _as_pg(
                [
                    str(bins / "pg_ctl"),
                    "-D",
                    str(data_dir()),
                    "-l",
                    str(log_file()),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ]
            ),
            timeout + 15,
            cwd=pg_dir(),
        )
        if result.returncode != 0 or pid() is None:
            if result.timed_out:
                cause = f"not ready within {timeout:.0f} s"
            else:
                cause = last_error_line(result.output, r"error|fatal|could not|did not start")
            raise InfraError(
                NAME,
                f"pg_ctl start failed: {cause}",
                f"{log_hint(log_file())}; fix the cause or raise LLMSTREAM_STARTUP_TIMEOUT_S",
            )
    # Also on reuse: a cluster made by an older version gets what this one expects.
    _ensure_role_and_database(bins, port)
    database_url = url(port)
    error = check(database_url, min(timeout, 10.0))
    if error is not None:
        # A cluster from an interrupted first run may lack the role or database.
        _ensure_role_and_database(bins, port)
        error = check(database_url, min(timeout, 10.0))
    if error is not None:
        raise InfraError(
            NAME,
            f"the server on 127.0.0.1:{port} does not accept {redact(database_url)} ({error})",
            f"{log_hint(log_file())}; `llmstream infra down` then up, or delete {data_dir()}",
        )
    record(database_url=database_url)
    return status()


def stop(kill: bool = False) -> bool:
    """Stop the postmaster on our data dir (SIGINT: fast shutdown; kill: SIGKILL now)."""
    postmaster = pid()
    if postmaster is None:
        return False
    if kill:
        kill_hard(postmaster)
        wait_dead(postmaster, 10.0)
    else:
        # SIGTERM would be a "smart" shutdown that waits for every client to disconnect.
        terminate(postmaster, STOP_TIMEOUT_S, signal.SIGINT)
    log.info("postgres: stopped postmaster pid %d", postmaster)
    return True
