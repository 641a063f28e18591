"""Where a process's time goes during a benchmark run, and CPU per delivered token.

`py_spy` samples running processes with py-spy (`py-spy record --nonblocking -f raw -p PID`,
the dev extra's py-spy; attaching needs ptrace, which root has) for as long as its block lasts,
then ranks functions by their share of the samples: `self` (the function was running) and
`inclusive` (it was on the stack). py-spy samples only threads that are running (not idle ones),
so a share is of the process's busy time. The raw stacks are kept beside the results.

`cpu_seconds` reads a process's user + system CPU from /proc (threads included).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

SAMPLES_PER_S = 100
ATTACH_TIMEOUT_S = 30.0
TOP = 12
_TICK = os.sysconf("SC_CLK_TCK")
_REPO = f"{Path(__file__).resolve().parents[2]}/"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def py_spy_binary() -> str:
    """py-spy next to this interpreter (the virtualenv's), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: pip install -e '.[dev]' (it pins py-spy)")
    return found


def _function(frame: str) -> str:
    """`name (path:line)` -> `name (path)`: a function's samples over all its lines."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0] if ":" in where else where.rstrip(")")
    return f"{name} ({_short(path)})" if path else name


def _short(path: str) -> str:
    """Paths from site-packages or this repository, without the machine's prefix."""
    for marker in ("site-packages/", _REPO, "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def rank(raw: str, top: int = TOP) -> dict[str, Any]:
    """Self and inclusive shares of the functions in py-spy's raw (collapsed) output: one
    line per distinct stack, `frame;frame;...;leaf count`."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        functions = [_function(f) for f in stack.split(";")]
        own[functions[-1]] += n
        for f in set(functions):
            inclusive[f] += n

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(n / total, 3)} for f, n in counter.most_common(top)]

    return {"samples": total, "self": shares(own), "inclusive": shares(inclusive)}


@contextlib.asynccontextmanager
async def py_spy(pids: dict[str, int], folder: Path, label: str) -> AsyncIterator[dict[str, Any]]:
    """Profile each process (name -> pid) while the block runs; the yielded dict is filled
    on exit with name -> {file, samples, self, inclusive}."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    binary = py_spy_binary()
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    profiles: dict[str, Any] = {}
    for name, pid in pids.items():
        out = folder / f"{label}-{name}.txt"
        argv = [
            binary, "record", "--nonblocking", "-r", str(SAMPLES_PER_S), "-f", "raw",
            "-o", str(out), "-p", str(pid),
        ]  # fmt: skip
        running[name] = (_spawn(argv), out)
    try:
        for name, (proc, _) in running.items():
            await asyncio.wait_for(asyncio.to_thread(_attached, proc, name), ATTACH_TIMEOUT_S)
        yield profiles
    finally:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        for name, (proc, out) in running.items():
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            if out.is_file():
                profiles[name] = {"file": str(out), **rank(out.read_text())}
            else:
                err = proc.stdout.read().decode(errors="replace")[-300:] if proc.stdout else ""
                profiles[name] = {"error": f"py-spy wrote nothing: {err.strip()}"}
            if proc.stdout is not None:
                proc.stdout.close()


def _attached(proc: subprocess.Popen[bytes], name: str) -> None:
    """Return once py-spy says it samples (so the measured work is not before it attached)."""
    assert proc.stdout is not None
    seen = []
    while line := proc.stdout.readline().decode(errors="replace"):
        if "Sampling process" in line:
            return
        seen.append(line.strip())
    raise RuntimeError(f"py-spy could not attach to {name}: {' / '.join(seen)[-400:]}")


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    # One pipe for both: py-spy says "Sampling process" on stdout, its errors on stderr.
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def summary(profiles: dict[str, Any], top: int = 5) -> str:
    """One line per process: its top `top` functions by self share."""
    parts = []
    for name, p in profiles.items():
        if "error" in p:
            parts.append(f"{name}: {p['error']}")
            continue
        tops = ", ".join(f"{f['function']} {f['share']:.0%}" for f in p["self"][:top])
        parts.append(f"{name} ({p['samples']} samples): {tops}")
    return "; ".join(parts)
