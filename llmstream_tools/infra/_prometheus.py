"""Private Prometheus from Debian's `prometheus` package (`llmstream infra up --with-prometheus`;
deploy/local/prometheus.sh, `make prometheus`, installs it), scraping the local services and
evaluating the alerting rules of deploy/prometheus/rules.

Layout ($LLMSTREAM_STATE_DIR/prometheus/): prometheus.pid, prometheus.log, port (59090 upward,
chosen once), prometheus.yml (written at every start), targets/<job>.json, data/ (the TSDB,
two days kept). A plain child process in its own session, never the package's system service.

What is scraped lives in targets/<job>.json (file-based service discovery): Prometheus reloads
them when they change, so whoever knows the ports (`write_targets`) points a running Prometheus
at them without a restart. `up()` writes the ports `llmstream up` serves /metrics on (the
LLMSTREAM_*_METRICS_PORT settings; the gateway's from llmstream_tools.local_ports). Jobs are named as in deploy/prometheus/prometheus.yml (gateway, model-server, worker,
aggregator), which the rules' `up{job=...}` terms rely on.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmstream import config
from llmstream_tools.local_ports import gateway_metrics_port

from ._common import (
    ComponentStatus,
    InfraError,
    apt_install,
    component_dir,
    log_hint,
    owned_pid,
    pick_port,
    port_free_soon,
    read_int,
    repo_deploy_dir,
    rotate_log,
    running_state,
    startup_timeout,
    stop_recorded,
    terminate,
    write_text,
)

log = logging.getLogger("llmstream_tools.infra")

NAME = "prometheus"
FIRST_PORT = 59090
STOP_TIMEOUT_S = 15.0
JOBS = ("gateway", "model-server", "worker", "aggregator")
# Scrape and rule evaluation of the local instance: as deploy/prometheus/prometheus.yml scrapes.
LOCAL_INTERVAL_S = 5.0


def prometheus_dir() -> Path:
    # Not created here: `infra status` and `down` only read it.
    return config.state_dir() / NAME


def pid_file() -> Path:
    return prometheus_dir() / "prometheus.pid"


def log_file() -> Path:
    return prometheus_dir() / "prometheus.log"


def port_file() -> Path:
    return prometheus_dir() / "port"


def rule_files() -> list[Path]:
    """The alerting rules of the source tree (deploy/prometheus/rules/*.yml)."""
    return sorted((repo_deploy_dir().parent / "prometheus" / "rules").glob("*.yml"))


def binary() -> str:
    """The prometheus executable, installed from Debian's package when missing."""
    found = shutil.which("prometheus")
    if found is None:
        apt_install(NAME, "prometheus")
        found = shutil.which("prometheus")
    if found is None:
        raise InfraError(
            NAME, "prometheus not found after installing", "run `make prometheus` and retry"
        )
    return found


# --------------------------------------------------------------------------- configuration


def duration(seconds: float) -> str:
    """Prometheus's duration syntax takes whole numbers only: 5s, 500ms."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise InfraError(NAME, f"interval {seconds} s is not positive", "use at least 1 ms")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def config_text(
    targets_dir: Path, rules: Sequence[Path], scrape_s: float, evaluation_s: float
) -> str:
    """prometheus.yml: one job per service, its targets from targets_dir/<job>.json."""
    cfg = {
        "global": {
            "scrape_interval": duration(scrape_s),
            "scrape_timeout": duration(min(scrape_s, 10.0)),
            "evaluation_interval": duration(evaluation_s),
        },
        "rule_files": [str(p) for p in rules],
        "scrape_configs": [
            {
                "job_name": job,
                "file_sd_configs": [{"files": [str(targets_dir / f"{job}.json")]}],
            }
            for job in JOBS
        ],
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def job_of(process: str) -> str:
    """The job of a process named as `llmstream up` and llmstream_tools/stack.py name them
    (`worker-1`, `gateway-2`, `model-server`, `aggregator`)."""
    for job in JOBS:
        if process == job or process.startswith(job + "-"):
            return job
    raise InfraError(NAME, f"no scrape job for process {process!r}", f"name it {' or '.join(JOBS)}")


def write_targets(targets_dir: Path, ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    """Point every job at the processes of `ports` (process name -> its /metrics port), each
    target labelled `process`; a job without a process gets an empty list."""
    groups: dict[str, list[dict[str, object]]] = {job: [] for job in JOBS}
    for process, port in sorted(ports.items()):
        groups[job_of(process)].append(
            {"targets": [f"{host}:{port}"], "labels": {"process": process}}
        )
    for job, entries in groups.items():
        write_text(targets_dir / f"{job}.json", json.dumps(entries, indent=2) + "\n")


def local_ports() -> dict[str, int]:
    """The /metrics ports `llmstream up` serves on (its settings; 0 is off)."""
    settings = {
        "model-server": "MODEL_SERVER_METRICS_PORT",
        "worker": "WORKER_METRICS_PORT",
        "aggregator": "AGGREGATOR_METRICS_PORT",
    }
    ports = {process: config.get_int(name) for process, name in settings.items()}
    ports["gateway"] = gateway_metrics_port()
    return {process: port for process, port in ports.items() if port > 0}


# --------------------------------------------------------------------------- process


def ready(port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def launch(directory: Path, port: int, log_path: Path, timeout_s: float) -> int:
    """Start Prometheus with directory/prometheus.yml and its TSDB in directory/data, listening
    on 127.0.0.1:port; returns its pid once it answers /-/ready."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [
                binary(),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                "--storage.tsdb.retention.time=2d",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while not ready(port):
        if proc.poll() is not None:
            raise InfraError(
                NAME, f"prometheus exited with status {proc.returncode}", log_hint(log_path)
            )
        if time.monotonic() > deadline:
            terminate(proc.pid, STOP_TIMEOUT_S)
            raise InfraError(
                NAME,
                f"prometheus did not answer /-/ready on 127.0.0.1:{port} within {timeout_s:.0f} s",
                f"{log_hint(log_path)}; raise LLMSTREAM_STARTUP_TIMEOUT_S or fix the cause",
            )
        time.sleep(0.1)
    return proc.pid


@dataclass(frozen=True)
class Server:
    """A Prometheus started by `start_private`; `stop()` ends it."""

    pid: int
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        terminate(self.pid, STOP_TIMEOUT_S)


def start_private(
    directory: Path,
    port: int,
    ports: Mapping[str, int],
    rules: Sequence[Path],
    interval_s: float,
) -> Server:
    """A Prometheus of its own in `directory` (tests: short intervals, their own rule files),
    scraping the processes of `ports` (process name -> /metrics port) every `interval_s`
    and evaluating `rules` as often."""
    directory.mkdir(parents=True, exist_ok=True)
    write_targets(directory / "targets", ports)
    text = config_text(directory / "targets", rules, interval_s, interval_s)
    write_text(directory / "prometheus.yml", text)
    pid = launch(directory, port, directory / "prometheus.log", startup_timeout())
    return Server(pid, port, directory)


# --------------------------------------------------------------------------- infra component


def pid() -> int | None:
    return owned_pid(pid_file(), "prometheus")


def status() -> ComponentStatus:
    port = read_int(port_file())
    address = f"http://127.0.0.1:{port}" if port else "(no port chosen yet)"
    server = pid()
    if server is None:
        return ComponentStatus(NAME, address, "stopped", log=str(log_file()))
    return ComponentStatus(NAME, address, running_state(server), server, str(log_file()))


def up() -> ComponentStatus:
    """Start (or reuse) the local Prometheus; its targets are rewritten for `llmstream up`."""
    directory = component_dir(NAME)
    write_targets(directory / "targets", local_ports())
    if pid() is not None:
        return status()
    port = pick_port(FIRST_PORT, port_file())
    if not port_free_soon(port):
        raise InfraError(
            NAME,
            f"port {port} (remembered in {port_file()}) is in use by another program",
            f"stop that program, or delete {port_file()} so a free port is chosen",
        )
    text = config_text(directory / "targets", rule_files(), LOCAL_INTERVAL_S, LOCAL_INTERVAL_S)
    write_text(directory / "prometheus.yml", text)
    rotate_log(log_file(), 16 * 1024 * 1024)
    log.info("prometheus: starting on 127.0.0.1:%d", port)
    server = launch(directory, port, log_file(), startup_timeout())
    write_text(pid_file(), f"{server}\n")
    return status()


def stop(kill: bool = False) -> bool:
    return stop_recorded("prometheus", pid(), pid_file(), kill, STOP_TIMEOUT_S)
