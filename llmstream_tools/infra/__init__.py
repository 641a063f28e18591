"""Local infrastructure for development and tests: Kafka, PostgreSQL, Redis (and Prometheus
on request: `up(OPTIONAL)`, `llmstream infra up --with-prometheus`).

`up()` starts what is missing (or reuses what runs), `down()` stops only what llmstream
started, `status()` reports. Servers pointed to by LLMSTREAM_KAFKA_BOOTSTRAP (other than the
local port), LLMSTREAM_DATABASE_URL or LLMSTREAM_REDIS_URL are external: checked, never started.
State (data, logs, pid files, chosen ports, infra.json) lives in LLMSTREAM_STATE_DIR; Kafka
jars in LLMSTREAM_CACHE_DIR. Every error is an `InfraError` whose message is one line:
component, cause, what to do. Everything is synchronous and every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import _kafka, _postgres, _prometheus, _redis
from ._common import ComponentStatus, InfraError, record, state_lock
from ._topics import ensure_topics

__all__ = [
    "COMPONENTS",
    "OPTIONAL",
    "ComponentStatus",
    "InfraError",
    "KafkaNode",
    "PrometheusServer",
    "apply_kafka_acls",
    "down",
    "ensure_topics",
    "kafka_bootstrap",
    "kafka_nodes",
    "kafka_pid",
    "optional_status",
    "start_component",
    "start_kafka_node",
    "start_prometheus",
    "status",
    "stop_component",
    "stop_kafka_node",
    "up",
]

COMPONENTS: tuple[str, ...] = ("kafka", "postgres", "redis")
# Started only when asked for; `down()` stops them too, `optional_status()` lists them while
# they run.
OPTIONAL: tuple[str, ...] = ("prometheus",)
PrometheusServer = _prometheus.Server
start_prometheus = _prometheus.start_private

_STATUS: dict[str, Callable[[], ComponentStatus]] = {
    "kafka": _kafka.status,
    "postgres": _postgres.status,
    "redis": _redis.status,
    "prometheus": _prometheus.status,
}
_STOP: dict[str, Callable[[bool], bool]] = {
    "kafka": _kafka.stop,
    "postgres": _postgres.stop,
    "redis": _redis.stop,
    "prometheus": _prometheus.stop,
}


def _check_names(components: Sequence[str]) -> list[str]:
    if isinstance(components, str):
        components = [components]
    names = []
    for name in components:
        if name not in COMPONENTS + OPTIONAL:
            raise InfraError(
                "infra",
                f"unknown component {name!r}",
                f"use one of {', '.join(COMPONENTS + OPTIONAL)}",
            )
        if name not in names:
            names.append(name)
    return names


def up(components: Sequence[str] = COMPONENTS, brokers: int | None = None) -> list[ComponentStatus]:
    """Start (or reuse) the components; returns their status in the order asked. Kafka's ACLs
    are (re)applied and every service's credentials recorded in infra.json (0600).

    `brokers`: Kafka nodes of a new state dir (1 when never set; a formatted cluster keeps its
    size, asking for another one is an error). The Kafka JVMs boot while PostgreSQL and Redis
    are started, then Kafka's readiness is awaited (a real Metadata request listing every
    node). Raises InfraError on the first failure.
    """
    names = _check_names(components)
    results: dict[str, ComponentStatus] = {}
    with state_lock():
        if brokers is not None and "kafka" in names:
            _kafka.set_brokers(brokers)
        kafka_wait = _kafka.begin_up() if "kafka" in names else None
        if "postgres" in names:
            results["postgres"] = _postgres.up()
        if "redis" in names:
            results["redis"] = _redis.up()
        if kafka_wait is not None:
            results["kafka"] = kafka_wait()
            record(kafka_bootstrap=results["kafka"].address, **_kafka.authorize())
        if "prometheus" in names:
            results["prometheus"] = _prometheus.up()
    return [results[name] for name in names]


def down(components: Sequence[str] = COMPONENTS + OPTIONAL) -> list[str]:
    """Stop what llmstream started (per the pid files); data is kept. Returns what stopped.

    External servers and servers started by anything else are never touched.
    """
    names = _check_names(components)
    stopped: list[str] = []
    with state_lock():
        for name in ("prometheus", "kafka", "redis", "postgres"):
            if name in names and _STOP[name](False):
                stopped.append(name)
    return stopped


def status() -> list[ComponentStatus]:
    return [_STATUS[name]() for name in COMPONENTS]


def optional_status() -> list[ComponentStatus]:
    """The OPTIONAL components that run."""
    return [s for s in (_STATUS[name]() for name in OPTIONAL) if s.running]


def stop_component(name: str, kill: bool = False) -> bool:
    """Stop one component llmstream started: graceful by default, SIGKILL with kill=True.

    Returns False if it was not running under llmstream (external servers are never touched).
    """
    (checked,) = _check_names([name])
    with state_lock():
        return _STOP[checked](kill)


def start_component(name: str) -> ComponentStatus:
    """Start (or reuse) one component; same rules as up()."""
    return up([name])[0]


def apply_kafka_acls() -> int:
    """Create the ACL matrix of `_kafka_auth` on the cluster infra uses (`infra init --acls`:
    the docker-compose and Kubernetes init jobs); returns the number of ACLs."""
    return _kafka.apply_acls()


def kafka_pid() -> int | None:
    """Pid of the Kafka broker started by llmstream (node 1 of a cluster; None if not running
    or external)."""
    return _kafka.pid()


def kafka_bootstrap() -> str:
    """Bootstrap servers infra uses: LLMSTREAM_KAFKA_BOOTSTRAP, else every local node
    (127.0.0.1:KAFKA_PORT for one)."""
    return _kafka.bootstrap()


@dataclass(frozen=True)
class KafkaNode:
    node_id: int  # the broker id in Kafka's metadata (partition leaders, replicas)
    address: str
    pid: int | None  # None: not running


def kafka_nodes() -> list[KafkaNode]:
    """The local Kafka nodes (one unless `up(brokers=N)` made a cluster)."""
    return [KafkaNode(n.node_id, n.address, n.pid()) for n in _kafka.nodes()]


def stop_kafka_node(node_id: int, kill: bool = False) -> bool:
    """Stop one local Kafka node: graceful by default, SIGKILL with kill=True."""
    with state_lock():
        return _kafka.stop_node(node_id, kill)


def start_kafka_node(node_id: int) -> ComponentStatus:
    """Start one stopped local Kafka node; returns once it answers."""
    with state_lock():
        return _kafka.start_node(node_id)
