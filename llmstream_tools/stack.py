"""A whole llmstream deployment as local processes, for end-to-end tests and benchmarks.

`local_stack()` creates fresh topics and a fresh migrated database (so runs never see each
other), starts synthetic model server(s), workers, the aggregator and gateway replica(s) as real
`llmstream` processes against the infrastructure of `llmstream infra up` (the one the
LLMSTREAM_* variables of this process name), waits until every gateway is ready, and removes
everything afterwards. Processes can be killed and restarted by name while it runs (fault
tests): `model-server`, `worker-<i>`, `aggregator`, `gateway`; further replicas are
`model-server-<i>` and `gateway-<i>` (i >= 1).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from psycopg.conninfo import make_conninfo

from llmstream import config, kafka, migrate
from llmstream import topics as names
from llmstream.ports import free_port
from llmstream_tools import admin


def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    """An admin client of the tooling's principal (`admin`: creating and deleting topics)."""
    conn = kafka.Connection.from_env(config.ADMIN, bootstrap)
    return AIOKafkaAdminClient(**conn.client_kwargs("llmstream-stack"), request_timeout_ms=10000)


async def create_topics(bootstrap: str, partitions: dict[str, int], replication: int = 1) -> None:
    """Create topics (name -> partition count) for a test or benchmark run. With 3 replicas
    a write needs 2 of them (min.insync.replicas), as on the cluster's own topics."""
    configs = {"min.insync.replicas": "2"} if replication >= 3 else {}
    admin = _admin(bootstrap)
    await asyncio.wait_for(admin.start(), 15)
    try:
        topics = [NewTopic(n, p, replication, topic_configs=configs) for n, p in partitions.items()]
        await asyncio.wait_for(admin.create_topics(topics), 15)
        await asyncio.wait_for(_until_led(admin, partitions), 30)
    finally:
        await admin.close()


async def _until_led(admin: AIOKafkaAdminClient, partitions: dict[str, int]) -> None:
    """Wait until the broker's metadata names a leader for every new partition. CreateTopics
    answers before the brokers apply the new partitions (KRaft), and a client that starts at
    once meets NOT_LEADER_OR_FOLLOWER on produce and stalled fetches (CI run of stop 22)."""
    while True:
        described = await admin.describe_topics(list(partitions))
        led = {
            t["topic"]: sum(1 for p in t["partitions"] if p["error_code"] == 0 and p["leader"] >= 0)
            for t in described
            if t["error_code"] == 0
        }
        if all(led.get(name, 0) == count for name, count in partitions.items()):
            return
        await asyncio.sleep(0.05)


async def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    admin = _admin(bootstrap)
    await asyncio.wait_for(admin.start(), 15)
    try:
        await asyncio.wait_for(admin.delete_topics(list(names)), 15)
    finally:
        await admin.close()


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    database_url: str
    prompts_topic: str
    tokens_topic: str
    model_server: str
    gateway_port: int
    commands: dict[str, list[str]]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Every replica, first one first: gateway_ports[0] == gateway_port and
    # model_servers[0] == model_server.
    gateway_ports: list[int] = field(default_factory=list)
    model_servers: list[str] = field(default_factory=list)
    # process name -> port of its /metrics (a gateway's is not its public port); `metrics=True`.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        """Start (or restart) process `name`; its output is appended to `tmp/<name>.log`."""
        # Each process authenticates to Kafka and Redis as its own service (`worker-1`: worker).
        env = {**self.env, config.PREFIX + "PRINCIPAL": self.commands[name][0]}
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "llmstream_tools.cli", *self.commands[name]],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.procs[name]

    def kill(self, name: str) -> None:
        """SIGKILL: a crash, not a shutdown."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self, timeout_s: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()

    async def tenant_key(self, tier: str) -> tuple[str, str]:
        """A new tenant of `tier` in this stack's database and an API key: (tenant id, key)."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        tenant_id = await admin.create_tenant(name, tier, self.database_url)
        key = await admin.create_key(name, self.database_url)
        return tenant_id, key.key


@asynccontextmanager
async def local_stack(
    tmp: Path,
    *,
    workers: int = 2,
    partitions: int = 4,
    ttft_ms: float = 5,
    itl_ms: float = 2,
    extra_env: dict[str, str] | None = None,
    gateways: int = 1,
    model_servers: int = 1,
    metrics: bool = False,
    engine_args: list[str] | None = None,
    replication: int = 1,
) -> AsyncIterator[Stack]:
    """Gateway replica i owns an even share of the tokens partitions (`--replica-index i`);
    the workers use every model server replica. With `metrics`, every process serves
    /metrics (ports in `Stack.metrics_ports`). `replication`: replicas of the stack's topics
    (3 on a 3-broker cluster)."""
    bootstrap = config.kafka_bootstrap()
    base = f"stack-{uuid.uuid4().hex[:8]}"
    # Copies of the platform's topics and groups named after them (`llmstream.prompts.stack-
    # <hex>`): the Kafka ACLs, prefixed on the platform's names, treat them alike.
    topics = [f"{t}.{base}" for t in (names.prompts(), names.tokens(), names.dlq(), names.models())]
    server_db = config.database_url()
    db_name = f"llmstream_stack_{uuid.uuid4().hex[:8]}"
    stack: Stack | None = None
    try:
        await create_topics(
            bootstrap,
            {topics[0]: partitions, topics[1]: partitions, topics[2]: 1, topics[3]: 1},
            replication,
        )
        async with await psycopg.AsyncConnection.connect(
            server_db, autocommit=True, connect_timeout=10
        ) as conn:
            await conn.execute(f'CREATE DATABASE "{db_name}"'.encode())
        db = make_conninfo(server_db, dbname=db_name)
        await migrate.apply(db)
        ms_ports = [free_port() for _ in range(model_servers)]
        gw_ports = [free_port() for _ in range(gateways)]
        ms_addrs = [f"127.0.0.1:{p}" for p in ms_ports]
        env = {
            **os.environ,
            "LLMSTREAM_DATABASE_URL": db,
            "LLMSTREAM_TOPIC_PROMPTS": topics[0],
            "LLMSTREAM_TOPIC_TOKENS": topics[1],
            "LLMSTREAM_TOPIC_DLQ": topics[2],
            "LLMSTREAM_TOPIC_MODELS": topics[3],
            "LLMSTREAM_PROMPTS_PARTITIONS": str(partitions),
            "LLMSTREAM_TOKENS_PARTITIONS": str(partitions),
            "LLMSTREAM_WORKER_GROUP": f"{config.get('WORKER_GROUP')}.{base}",
            "LLMSTREAM_AGGREGATOR_GROUP": f"{config.get('AGGREGATOR_GROUP')}.{base}",
            "LLMSTREAM_MODEL_SERVERS": ",".join(ms_addrs),
            "LLMSTREAM_GATEWAY_PORT": str(gw_ports[0]),
            "LLMSTREAM_GATEWAY_MAX_INFLIGHT": "20000",
            "LLMSTREAM_WORKER_MAX_INFLIGHT": "1024",
            "LLMSTREAM_WORKER_METRICS_PORT": "0",
            "LLMSTREAM_AGGREGATOR_METRICS_PORT": "0",
            "LLMSTREAM_LOG_LEVEL": "INFO",
            **(extra_env or {}),
        }
        # `engine_args` (e.g. `--engine llamacpp ...`) replace the synthetic engine's.
        synthetic = [
            "--engine", "synthetic", "--synthetic-ttft-ms", str(ttft_ms),
            "--synthetic-itl-ms", str(itl_ms), "--max-concurrency", "2048", "--max-queue", "2048",
        ]  # fmt: skip
        commands = {
            **{_replica("model-server", i): [
                "model-server", "--port", str(port), "--metrics-port", "0",
                "--drain-timeout-s", "0", *(engine_args or synthetic),
            ] for i, port in enumerate(ms_ports)},
            **{f"worker-{i}": ["worker", "--id", f"{base}.w{i}"] for i in range(workers)},
            "aggregator": ["aggregator", "--no-migrate"],
            **{_replica("gateway", i): [
                "gateway", "--id", f"{base}.gw" + (f"{i}" if i else ""), "--port", str(port),
                "--replica-index", str(i), "--replicas", str(gateways),
            ] for i, port in enumerate(gw_ports)},
        }  # fmt: skip
        stack = Stack(
            tmp, env, db, topics[0], topics[1], ms_addrs[0], gw_ports[0], commands,
            gateway_ports=gw_ports, model_servers=ms_addrs,
        )  # fmt: skip
        if metrics:
            for name, argv in commands.items():
                # A later --metrics-port overrides the "0" some commands carry; a gateway
                # serves /metrics only on a port of its own, never on its public one.
                stack.metrics_ports[name] = free_port()
                argv += ["--metrics-port", str(stack.metrics_ports[name])]
        for name in commands:
            stack.start(name)
        for port in gw_ports:
            await _wait_ready(port, stack)
        yield stack
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop_all)
        await delete_topics(bootstrap, topics)
        async with await psycopg.AsyncConnection.connect(
            server_db, autocommit=True, connect_timeout=10
        ) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'.encode())


def _replica(name: str, index: int) -> str:
    """Process name of replica `index`: the first keeps the plain name."""
    return f"{name}-{index}" if index else name


async def _wait_ready(port: int, stack: Stack, within_s: float = 60.0) -> None:
    end = time.monotonic() + within_s
    while True:
        dead = [n for n, p in stack.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited during start-up; see {stack.tmp}")
        try:
            await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{port}/readyz", timeout=2
            )
            return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"gateway not ready in {within_s:.0f}s; see {stack.tmp}"
                ) from None
            await asyncio.sleep(0.3)
