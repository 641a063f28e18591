"""Shared plumbing of the local infrastructure: errors, state files, processes, ports.

Everything here is synchronous and bounded: every wait has a timeout, and subprocess output
goes to temporary files (never pipes), so a daemon that inherits a descriptor cannot make a
call hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from llmstream import config

log = logging.getLogger("llmstream_tools.infra")

T = TypeVar("T")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class InfraError(RuntimeError):
    """A component could not be brought up; the message is one line: component, cause, fix."""

    def __init__(self, component: str, cause: str, fix: str = "") -> None:
        message = f"{component}: {one_line(cause, 400)}"
        if fix:
            message += f"; {one_line(fix)}"
        super().__init__(message)
        self.component = component


@dataclass
class ComponentStatus:
    name: str
    address: str
    state: str  # "running (started by llmstream, pid N)", "running (external)", "stopped", ...
    pid: int | None = None
    log: str = ""  # log file of a server started by llmstream
    detail: str = ""  # version, data dir, or why it is not answering

    @property
    def running(self) -> bool:
        return self.state.startswith("running")

    @property
    def started_by_llmstream(self) -> bool:
        return "started by llmstream" in self.state

    def __str__(self) -> str:
        text = f"{self.name:<9} {self.state:<44} {self.address}"
        if self.detail:
            text += f"  ({self.detail})"
        return text


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def running_state(pid: int) -> str:
    return f"running (started by llmstream, pid {pid})"


# --------------------------------------------------------------------------- paths and state


def repo_deploy_dir() -> Path:
    """deploy/local of the source tree this package was imported from."""
    return Path(__file__).resolve().parents[2] / "deploy" / "local"


def component_dir(name: str) -> Path:
    path = config.state_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def startup_timeout() -> float:
    value = config.get_int("STARTUP_TIMEOUT_S")
    return float(max(value, 1))


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Atomic write (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_int(path: Path) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    first = text.splitlines()[0].strip() if text else ""
    return int(first) if first.isdigit() else None


def infra_json() -> Path:
    return config.state_dir() / "infra.json"


def record(**values: object) -> None:
    """Merge keys into $STATE_DIR/infra.json (0600: it holds credentials; other keys are
    kept)."""
    path = infra_json()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    data.update(values)
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)


_lock_depth = threading.local()


@contextlib.contextmanager
def state_lock(timeout: float = 900.0) -> Iterator[None]:
    """Serialize `infra up/down` runs that share a state dir (re-entrant within a thread)."""
    depth = getattr(_lock_depth, "value", 0)
    if depth:
        _lock_depth.value = depth + 1
        try:
            yield
        finally:
            _lock_depth.value -= 1
        return
    state = config.state_dir()
    state.mkdir(parents=True, exist_ok=True)
    path = state / "infra.lock"
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InfraError(
                        "infra",
                        f"another `llmstream infra` command holds {path} for over {timeout:.0f} s",
                        "wait for it to finish or stop it",
                    ) from None
                time.sleep(0.2)
        _lock_depth.value = 1
        try:
            yield
        finally:
            _lock_depth.value = 0
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- processes


@dataclass
class Result:
    returncode: int
    output: str
    timed_out: bool = False


def run(
    cmd: Sequence[str],
    timeout: float,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run a command to completion with a timeout; stdout+stderr captured via a temp file.

    The command gets its own session; on timeout the whole process group is killed.
    """
    with tempfile.TemporaryFile(mode="w+b") as out:
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return Result(127, f"cannot run {cmd[0]}: {exc}")
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        return Result(proc.returncode if proc.returncode is not None else -9, text, timed_out)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def last_error_line(output: str, pattern: str = r"error|fatal|exception|failed|could not") -> str:
    """The first line of output matching pattern (else its last line), ANSI codes removed."""
    lines = [ln.strip() for ln in _ANSI.sub("", output).splitlines() if ln.strip()]
    regex = re.compile(pattern, re.IGNORECASE)
    for ln in lines:
        if regex.search(ln):
            return one_line(ln, 400)
    return one_line(lines[-1], 400) if lines else "(no output)"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (reaps it if it is our child)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = read_text(Path(f"/proc/{pid}/stat"))
    if stat is None:
        return False
    # Field 3 (after the parenthesised command name) is the state letter.
    state = stat.rsplit(")", 1)[-1].split()[:1]
    if state not in (["Z"], ["X"]):
        return True
    # A zombie thread-group leader whose other threads are still exiting still holds the
    # process's sockets: alive until they are gone.
    status = read_text(Path(f"/proc/{pid}/status")) or ""
    threads = re.search(r"^Threads:\s*(\d+)", status, re.MULTILINE)
    return bool(threads and int(threads.group(1)) > 1)


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


def owned_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in pid_file if that process is alive and its command line contains marker.

    A stale pid file (dead process, or a pid reused by an unrelated program) is removed.
    """
    pid = read_int(pid_file)
    if pid is None:
        return None
    if pid_alive(pid) and marker in cmdline(pid):
        return pid
    log.info("removing stale pid file %s (pid %s is not running)", pid_file, pid)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return None


def terminate(pid: int, timeout: float, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send sig, wait up to timeout, then SIGKILL (the process group if pid leads one).

    Returns True if the process had to be killed.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if wait_dead(pid, timeout):
        return False
    log.warning("pid %d did not exit %.0f s after %s; sending SIGKILL", pid, timeout, sig.name)
    kill_hard(pid)
    wait_dead(pid, 10)
    return True


def kill_hard(pid: int) -> None:
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_recorded(name: str, pid: int | None, pid_file: Path, kill: bool, timeout: float) -> bool:
    """Stop the server whose pid `pid_file` records (SIGTERM, waiting up to `timeout`; `kill`:
    SIGKILL now) and forget the file. False when nothing was running."""
    if pid is None:
        return False
    if kill:
        kill_hard(pid)
        wait_dead(pid, 10.0)
    else:
        terminate(pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    log.info("%s: stopped pid %d", name, pid)
    return True


def tail(path: Path, lines: int = 200) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln for ln in data.splitlines() if ln.strip()][-lines:]


_SEVERE = re.compile(r"\b(ERROR|FATAL|PANIC)\b")
_EXCEPTION = re.compile(r"^(Caused by: )?[\w.$]+(Exception|Error|Fault)\b")
_TIMESTAMP = re.compile(r"^\[[^\]]*\]\s*")


def log_hint(path: Path) -> str:
    """'see <log> (last: <last error line and its root exception>)' for error messages."""
    lines = tail(path)
    severe = [i for i, ln in enumerate(lines) if _SEVERE.search(ln)]
    if severe:
        first = severe[-1]
        last = _TIMESTAMP.sub("", lines[first].strip())
        causes = [
            ln.strip() for ln in lines[first + 1 : first + 60] if _EXCEPTION.match(ln.strip())
        ]
        if causes:
            last += " / " + causes[-1]
    else:
        last = _TIMESTAMP.sub("", lines[-1].strip()) if lines else ""
    hint = f"see {path}"
    if last:
        hint += f" (last: {one_line(last, 240)})"
    return hint


def rotate_log(path: Path, max_bytes: int = 0) -> None:
    """Keep one previous log: path -> path.1 (only when larger than max_bytes)."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))


# --------------------------------------------------------------------------- ports


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could bind host:port (same SO_REUSEADDR semantics as servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_free_soon(port: int, timeout: float = 1.0) -> bool:
    """port_free, retried for a moment (a server that just died may still hold the port)."""
    deadline = time.monotonic() + timeout
    while not port_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pick_port(start: int, remembered: Path, tries: int = 200) -> int:
    """The port remembered in the state dir, else the first free one from start upward."""
    port = read_int(remembered)
    if port is not None:
        return port
    for candidate in range(start, min(start + tries, 65536)):
        if port_free(candidate):
            write_text(remembered, f"{candidate}\n")
            return candidate
    raise InfraError(
        remembered.parent.name,
        f"no free TCP port in {start}..{start + tries - 1}",
        "free one of them",
    )


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    address = address.strip()
    if address.startswith("["):  # [ipv6]:port
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port.isdigit() else default_port
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    return host, int(port) if port.isdigit() else default_port


def kafka_api_versions(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if host:port answers a Kafka ApiVersions v0 request without error."""
    client_id = b"llmstream-infra-probe"
    correlation_id = 0x11A7
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exact(s, 4)
            size = struct.unpack(">i", header)[0]
            if size < 6 or size > 1 << 20:
                return False
            payload = _recv_exact(s, size)
    except (OSError, ValueError):
        return False
    corr, error = struct.unpack(">ih", payload[:6])
    return bool(corr == correlation_id and error == 0)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ValueError("connection closed")
        buf += chunk
    return buf


# --------------------------------------------------------------------------- async bridge


def run_async(factory: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Run a coroutine to completion from sync code, even when an event loop is running.

    With a running loop (e.g. called from an async test) the coroutine runs in a fresh loop
    on a worker thread; the caller's loop is blocked meanwhile, like any sync call.
    """

    async def bounded() -> T:
        return await asyncio.wait_for(factory(), timeout)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, bounded()).result(timeout=timeout + 5)


# --------------------------------------------------------------------------- packages


def apt_install(component: str, package: str, timeout: float = 900.0) -> None:
    """apt-get update && apt-get install -y package (root only)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InfraError(
            component,
            f"{package} is not installed and this is not a root Debian/Ubuntu shell",
            f"install it (apt-get install {package}) or set LLMSTREAM_"
            f"{'DATABASE' if component == 'postgres' else component.upper()}_URL",
        )
    log.info("%s: installing Debian package %s (apt-get)", component, package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", package],
    ):
        result = run(cmd, timeout, env=env)
        if result.returncode != 0:
            cause = "timed out" if result.timed_out else last_error_line(result.output)
            raise InfraError(
                component,
                f"`{' '.join(cmd)}` failed: {cause}",
                f"install {package} by hand (apt-get install {package}); the Debian mirror must "
                "be reachable",
            )
