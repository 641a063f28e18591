"""`llmstream up` (what `make up` runs): infrastructure, schema, a dev key, every service.

Stays in the foreground; Ctrl-C (or SIGTERM) stops the services and the infrastructure that
this run started, and leaves alone what was already running. Services whose package is not
built yet are listed and skipped, so `up` always starts what exists. The URL is printed once
the model server is SERVING (a vLLM engine takes 10-40 s to load on CPU), so the page works
from the first prompt. `--engine vllm` (`make up ENGINE=vllm`) needs `make vllm`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmstream import config
from llmstream_tools import local_ports
from model_server import vllm_env


@dataclass(frozen=True)
class Service:
    name: str
    package: str
    args: tuple[str, ...]


def services(engine: str) -> list[Service]:
    # Start order matters: the model server must load before workers connect to it.
    return [
        Service("model-server", "model_server.cli", ("model-server", "--engine", engine)),
        Service("worker", "worker.cli", ("worker",)),
        Service("aggregator", "aggregator.cli", ("aggregator",)),
        Service("gateway", "gateway.cli", ("gateway",)),
    ]


def _built(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


async def _dev_key() -> str:
    """The dev tenant's key, kept in the state dir so every `up` prints the same one.

    One file per database: a key is only valid in the database that holds its hash.
    """
    from llmstream_tools import admin

    database = hashlib.sha256(config.database_url().encode()).hexdigest()[:12]
    path = config.state_dir() / f"dev_api_key.{database}"
    if path.exists():
        key = path.read_text().strip()
        if await admin.key_is_active(key):
            return key
    with contextlib.suppress(admin.AdminError):  # the dev tenant exists already
        await admin.create_tenant("dev", "standard")
    new = await admin.create_key("dev")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.key + "\n")
    path.chmod(0o600)
    return new.key


def _vllm_missing() -> str:
    """Why the vllm engine cannot start here, in one line ("" when it can)."""
    if not vllm_env.vllm_importable() and not os.access(vllm_env.vllm_python(), os.X_OK):
        return f"--engine vllm needs its virtualenv: {vllm_env.INSTALL_HINT}"
    if not config.get("VLLM_MODEL"):
        try:
            vllm_env.default_model()
        except FileNotFoundError as exc:
            return str(exc)
    return ""


def _served_model(engine: str) -> str:
    """The model name the model server serves (what the browser page preselects)."""
    if engine == "vllm" and config.get("VLLM_MODEL"):
        return os.path.basename(config.get("VLLM_MODEL").rstrip("/"))
    return {"synthetic": "synthetic"}.get(engine, "smollm2")


def _wait_serving(proc: subprocess.Popen[bytes], stopping: Callable[[], bool]) -> bool:
    """Until the model server reports SERVING (True), or exits or a signal came (False)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    addr = f"127.0.0.1:{config.get('MODEL_SERVER_PORT')}"
    print(f"  waiting for the model server on {addr} to load ...", flush=True)
    with grpc.insecure_channel(addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while proc.poll() is None and not stopping():
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    return False


def _stop(procs: dict[str, subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    # Reverse start order: the gateway drains first, the model server last.
    for proc in reversed(list(procs.values())):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for name, proc in procs.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in {timeout_s:.0f}s: killed", file=sys.stderr)
            proc.kill()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmstream up", description=__doc__)
    parser.add_argument(
        "--engine",
        default=config.get("ENGINE"),
        choices=("llamacpp", "synthetic", "vllm"),
        help="model server engine (default: LLMSTREAM_ENGINE or llamacpp)",
    )
    parser.add_argument(
        "--no-services", action="store_true", help="only infrastructure, schema and dev key"
    )
    args = parser.parse_args(list(argv))
    if args.engine == "vllm" and not args.no_services and (err := _vllm_missing()):
        print(f"llmstream up: {err}", file=sys.stderr)
        return 2

    from llmstream import migrate
    from llmstream_tools import infra

    before = {s.name: s.state for s in infra.status()}
    try:
        statuses = infra.up()
        infra.ensure_topics()
        asyncio.run(migrate.apply(config.database_url()))
        key = asyncio.run(_dev_key())
    except (infra.InfraError, config.ConfigError) as exc:
        print(f"llmstream up: {exc}", file=sys.stderr)
        return 1
    started_infra = [s.name for s in statuses if not before.get(s.name, "").startswith("running")]
    for s in statuses:
        print(f"  {s.name:<10} {s.address:<40} {s.state}")

    # The browser page preselects the model this run's model server serves.
    env = os.environ.copy()
    env.setdefault(config.PREFIX + "GATEWAY_DEFAULT_MODEL", _served_model(args.engine))
    env[config.PREFIX + "GATEWAY_METRICS_PORT"] = str(local_ports.gateway_metrics_port())
    logs = config.state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = False

    def _on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    missing = []
    if not args.no_services:
        for svc in services(args.engine):
            if not _built(svc.package):
                missing.append(svc.name)
                continue
            log_path = logs / f"{svc.name}.log"
            with open(log_path, "ab") as log_file:
                procs[svc.name] = subprocess.Popen(
                    [sys.executable, "-m", "llmstream_tools.cli", *svc.args],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    # Each service authenticates to Kafka and Redis as itself.
                    env={**env, config.PREFIX + "PRINCIPAL": svc.name},
                )
            print(f"  {svc.name:<10} started (pid {procs[svc.name].pid}, log {log_path})")
    if missing:
        print(f"  not built yet, skipped: {', '.join(missing)}")
    serving = "model-server" not in procs or _wait_serving(procs["model-server"], lambda: stop)

    if serving:
        host, port = config.get("GATEWAY_HOST"), config.get("GATEWAY_PORT")
        print()
        print(
            f"llmstream is up: http://{host}:{port}/"
            if "gateway" in procs
            else "llmstream infra is up"
        )
        print(f"dev API key (tenant 'dev'): {key}")
        print("Ctrl-C stops everything this command started.")
        sys.stdout.flush()
    exit_code = 0
    try:
        while not stop:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(
                        f"llmstream up: {name} exited with {proc.returncode}; "
                        f"see {logs / (name + '.log')}",
                        file=sys.stderr,
                    )
                    stop, exit_code = True, 1
            time.sleep(0.5)
    finally:
        print("stopping ...", file=sys.stderr)
        _stop(procs)
        if started_infra:
            stopped = infra.down(started_infra)
            print(f"stopped {', '.join(stopped) or 'nothing'}", file=sys.stderr)
    return exit_code
