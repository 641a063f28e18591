"""`llmstream up` (what `make up` runs) against the real infrastructure."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from llmstream import config
from llmstream_tools import infra

pytestmark = pytest.mark.integration


def test_up_reuses_running_infra_prints_key_and_stops_cleanly(db_env: str) -> None:
    before = {s.name: s.pid for s in infra.status()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmstream_tools.cli", "up", "--no-services"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    output = "".join(lines)
    key_lines = [line for line in lines if line.startswith("dev API key")]
    assert key_lines, output
    assert "lsk_" in key_lines[0]
    for name in ("kafka", "postgres", "redis"):
        assert name in output
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    # Infrastructure that was already running is left alone.
    after = {s.name: s.pid for s in infra.status()}
    assert after == before

    # A second run prints the same key (kept in the state dir, still valid).
    again = subprocess.Popen(
        [sys.executable, "-m", "llmstream_tools.cli", "up", "--no-services"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert again.stdout is not None
    second = ""
    while not second.startswith("dev API key"):
        second = again.stdout.readline()
        assert second, "up exited early"
    again.send_signal(signal.SIGINT)
    assert again.wait(30) == 0
    assert second == key_lines[0]
    # The key file belongs to this session's throwaway database: remove it.
    database = hashlib.sha256(db_env.encode()).hexdigest()[:12]
    (config.state_dir() / f"dev_api_key.{database}").unlink()


def test_up_with_unreachable_database_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", "postgresql://u:p@127.0.0.1:1/none")
    run = subprocess.run(
        [sys.executable, "-m", "llmstream_tools.cli", "up", "--no-services"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "postgres" in run.stderr.lower()
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
