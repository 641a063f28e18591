"""Local Apache Kafka (KRaft, every node a combined broker + controller) from Maven Central jars:
one node by default, or a cluster of N (`llmstream infra up --brokers 3`: replication factor 3,
`min.insync.replicas=2`, a static quorum of N controllers) to test broker failures. Clients
authenticate (SASL/SCRAM, a user per service) and ACLs say what each may do: `_kafka_auth`.

Modules: `_kafka_nodes` (addresses, paths, cluster size), `_kafka_setup` (Java, jars, ports,
server.properties, storage format), `_kafka_auth` (users, ACLs); this one probes, reports,
starts and stops the nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import _kafka_auth
from ._common import (
    ComponentStatus,
    InfraError,
    kafka_api_versions,
    kill_hard,
    log_hint,
    pid_alive,
    port_free_soon,
    rotate_log,
    run_async,
    running_state,
    startup_timeout,
    terminate,
    write_text,
)
from ._kafka_nodes import (
    NAME,
    Node,
    bootstrap,
    brokers,
    data_dir,
    is_external,
    kafka_dir,
    local_address,
    log_file,
    node,
    nodes,
    pid,
    port,
    set_brokers,
    version,
)
from ._kafka_setup import (
    cluster_ports,
    controller_port,
    ensure_formatted,
    ensure_jars,
    find_java,
    jvm,
    render_properties,
    rendered_port,
)

__all__ = [
    "begin_up",
    "bootstrap",
    "nodes",
    "pid",
    "set_brokers",
    "start_node",
    "status",
    "stop",
    "stop_node",
    "up",
]

log = logging.getLogger("llmstream_tools.infra")

STOP_TIMEOUT_S = 30.0

# Popen objects of brokers started by this process (kept so they are not reported as leaked).
_children: list[subprocess.Popen[bytes]] = []


# --------------------------------------------------------------------------- probes


async def _metadata(servers: str, timeout_s: float) -> int:
    """Bootstrap an aiokafka client (a real Metadata request); returns the number of brokers."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(
        bootstrap_servers=servers,
        client_id="llmstream-infra",
        request_timeout_ms=max(int(timeout_s * 1000), 1000),
        **_kafka_auth.client_kwargs(),
    )
    try:
        await client.bootstrap()
        return len(client.cluster.brokers())
    finally:
        await client.close()


def metadata_error(servers: str, timeout_s: float = 10.0, want: int = 1) -> str | None:
    """None if a Metadata request to servers lists at least `want` brokers, else the cause."""
    try:
        brokers_seen = run_async(lambda: _metadata(servers, timeout_s), timeout_s)
    except TimeoutError:
        return f"no answer within {timeout_s:.0f} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if brokers_seen >= want:
        return None
    return "metadata lists no brokers" if not brokers_seen else f"{brokers_seen} of {want} brokers"


# --------------------------------------------------------------------------- status


def status() -> ComponentStatus:
    if is_external():
        error = metadata_error(bootstrap(), 5.0)
        state = "running (external)" if error is None else "unreachable (external)"
        return ComponentStatus(NAME, bootstrap(), state, detail=error or "")
    if brokers() > 1:
        return _cluster_status()
    address = local_address()
    broker = pid()
    detail = f"Kafka {version()} KRaft, {_kafka_auth.describe()}, data {data_dir()}"
    if broker is not None:
        if not kafka_api_versions("127.0.0.1", port(), 2.0):
            detail = "not answering yet; " + detail
        return ComponentStatus(
            NAME, address, running_state(broker), broker, str(log_file()), detail
        )
    if kafka_api_versions("127.0.0.1", port(), 2.0):
        return ComponentStatus(NAME, address, "running (external)")
    return ComponentStatus(NAME, address, "stopped", log=str(log_file()))


def _cluster_status() -> ComponentStatus:
    pids = {n.node_id: n.pid() for n in nodes()}
    up = [i for i, p in pids.items() if p is not None]
    detail = (
        f"Kafka {version()} KRaft, {_kafka_auth.describe()}, {len(pids)} nodes, pids "
        + ", ".join(f"{i}:{p or '-'}" for i, p in pids.items())
    )
    first = pids[1]
    if len(up) == len(pids) and first is not None:
        state = running_state(first)
    elif up:
        state = f"degraded ({len(up)} of {len(pids)} brokers running)"
    else:
        state = "stopped"
    return ComponentStatus(NAME, bootstrap(), state, first, str(log_file()), detail)


# --------------------------------------------------------------------------- lifecycle


def _wait_ready(n: Node, broker: int, timeout: float, started_here: bool, want: int = 1) -> None:
    """Until the node answers ApiVersions and a real Metadata request (aiokafka bootstrap)
    listing at least `want` brokers."""
    deadline = time.monotonic() + timeout
    address = n.address
    last_error = "not listening yet"
    assert n.port is not None
    while True:
        if not pid_alive(broker):
            with contextlib.suppress(FileNotFoundError):
                n.pid_file.unlink()
            raise InfraError(
                NAME,
                f"the broker (pid {broker}) exited during startup",
                f"{log_hint(n.log_file)}; fix the cause (LLMSTREAM_KAFKA_EXTRA_PROPERTIES, "
                f"ports, disk) and run `llmstream infra up` again",
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if started_here:
                log.warning("kafka: stopping broker pid %d that did not become ready", broker)
                terminate(broker, 10.0)
                with contextlib.suppress(FileNotFoundError):
                    n.pid_file.unlink()
            raise InfraError(
                NAME,
                f"the broker did not answer on {address} within {timeout:.0f} s ({last_error})",
                f"{log_hint(n.log_file)}; raise LLMSTREAM_STARTUP_TIMEOUT_S or run "
                "`llmstream infra down` and retry",
            )
        if kafka_api_versions("127.0.0.1", n.port, min(2.0, max(remaining, 0.1))):
            error = metadata_error(address, min(10.0, max(remaining, 0.5)), want)
            if error is None:
                return
            last_error = error
        time.sleep(min(0.2, max(remaining, 0.01)))


def _spawn(java: str, libs: Path, n: Node) -> int:
    """Start the node's broker (its storage formatted, its properties rendered)."""
    rotate_log(n.log_file)
    cmd = [*jvm(java, libs, "INFO", n.dir), "kafka.Kafka", str(n.props_file)]
    with open(n.log_file, "ab") as out:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=n.dir,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise InfraError(
                NAME, f"cannot start {java}: {exc}", "check the Java install"
            ) from None
    _children.append(proc)
    write_text(n.pid_file, f"{proc.pid}\n")
    log.info(
        "kafka: started node %d pid %d on %s (log %s)", n.node_id, proc.pid, n.address, n.log_file
    )
    return proc.pid


def begin_up() -> Callable[[], ComponentStatus]:
    """Start (or find) Kafka; returns a function that waits for readiness.

    Split in two so `infra up` can start PostgreSQL and Redis while the JVM boots.
    """
    if is_external():
        servers = bootstrap()
        error = metadata_error(servers, min(startup_timeout(), 10.0))
        if error is not None:
            raise InfraError(
                NAME,
                f"LLMSTREAM_KAFKA_BOOTSTRAP={servers} does not answer ({error})",
                "start that cluster, or unset LLMSTREAM_KAFKA_BOOTSTRAP so `llmstream infra up` "
                "starts a local broker",
            )
        external = ComponentStatus(NAME, servers, "running (external)")
        return lambda: external
    if brokers() > 1:
        return _begin_cluster_up()

    timeout = startup_timeout()
    broker = pid()
    first = Node(1)
    if broker is not None:
        running_port = rendered_port()
        if running_port is not None and running_port != port():
            raise InfraError(
                NAME,
                f"the broker llmstream started (pid {broker}) listens on port {running_port} but "
                f"LLMSTREAM_KAFKA_PORT is {port()}",
                "run `llmstream infra down` first, or set LLMSTREAM_KAFKA_PORT back",
            )

        def reuse() -> ComponentStatus:
            _wait_ready(first, broker, timeout, started_here=False)
            return status()

        return reuse

    if kafka_api_versions("127.0.0.1", port(), 2.0):
        address = local_address()
        log.info("kafka: a Kafka broker already answers on %s; using it", address)
        return lambda: ComponentStatus(NAME, address, "running (external)")
    if not port_free_soon(port()):
        raise InfraError(
            NAME,
            f"port {port()} is in use by another program (it does not answer Kafka requests)",
            "stop that program, or set LLMSTREAM_KAFKA_PORT (and LLMSTREAM_KAFKA_BOOTSTRAP) to "
            "a free port",
        )

    java = find_java()
    libs = ensure_jars()
    render_properties(first, {1: (port(), controller_port())})
    ensure_formatted(java, libs, first)
    started = _spawn(java, libs, first)

    def wait() -> ComponentStatus:
        _wait_ready(first, started, timeout, started_here=True)
        return status()

    return wait


def _begin_cluster_up() -> Callable[[], ComponentStatus]:
    """Every node not running is started at once: a node alone cannot answer before a
    majority of the controllers runs, so the wait comes after all have started."""
    timeout = startup_timeout()
    ports = cluster_ports()
    running = {n: n.pid() for n in nodes()}
    missing = [n for n, p in running.items() if p is None]
    for n in missing:
        if not port_free_soon(ports[n.node_id][0]):
            raise InfraError(
                NAME,
                f"port {ports[n.node_id][0]} of node {n.node_id} is in use by another program",
                f"stop that program, or delete {n.dir} and {kafka_dir()}/brokers to start over",
            )
    if missing:
        java = find_java()
        libs = ensure_jars()
        for n in missing:
            n.dir.mkdir(parents=True, exist_ok=True)
            render_properties(n, ports)
            ensure_formatted(java, libs, n)
        for n in missing:
            running[n] = _spawn(java, libs, n)

    def wait() -> ComponentStatus:
        for n, broker in running.items():
            assert broker is not None
            _wait_ready(n, broker, timeout, started_here=n in missing, want=len(running))
        return status()

    return wait


def up() -> ComponentStatus:
    return begin_up()()


def authorize() -> dict[str, object]:
    """Apply the ACL matrix to a local cluster with authentication; returns what infra.json
    records about Kafka's credentials (nothing for an external cluster: its clients bring their
    own through LLMSTREAM_KAFKA_USERNAME/PASSWORD)."""
    if is_external():
        return {}
    if _kafka_auth.active():
        apply_acls()
        _kafka_auth.write_client_configs()
    return _kafka_auth.record_values()


def apply_acls() -> int:
    """The ACL matrix on the cluster infra uses (an external one: as LLMSTREAM_KAFKA_USERNAME,
    which must be allowed to create ACLs, and without the local test prefixes)."""
    servers, local = bootstrap(), not is_external()
    timeout = min(startup_timeout(), 30.0)
    try:
        count = run_async(lambda: _kafka_auth.apply_acls(servers, timeout, local), timeout + 5)
    except InfraError:
        raise
    except Exception as exc:
        raise InfraError(
            NAME,
            f"applying the ACLs on {servers} failed ({type(exc).__name__}: {exc})",
            log_hint(log_file()) if local else "the user needs the Alter permission on the cluster",
        ) from None
    log.info("kafka: %d ACLs in place", count)
    return count


def start_node(node_id: int) -> ComponentStatus:
    """Start one node of the cluster (after `stop_node`); returns once it answers."""
    n = node(node_id)
    broker = n.pid()
    if broker is None:
        broker = _spawn(find_java(), ensure_jars(), n)
    _wait_ready(n, broker, startup_timeout(), started_here=False)
    return status()


def stop_node(node_id: int, kill: bool = False) -> bool:
    """Stop one node (SIGTERM: controlled shutdown; kill: SIGKILL now)."""
    n = node(node_id)
    broker = n.pid()
    if broker is None:
        return False
    if kill:
        kill_hard(broker)
        terminate(broker, 10.0)
    else:
        terminate(broker, STOP_TIMEOUT_S)
    with contextlib.suppress(FileNotFoundError):
        n.pid_file.unlink()
    log.info("kafka: stopped node %d pid %d", n.node_id, broker)
    return True


def stop(kill: bool = False) -> bool:
    """Stop every broker llmstream started (SIGTERM: controlled shutdown; kill: SIGKILL now).
    The signals go out together: a cluster's last nodes would wait for a quorum that the
    first ones, stopped alone, had taken away."""
    running = [(n, p) for n in nodes() if (p := n.pid()) is not None]
    for _, broker in running:
        if kill:
            kill_hard(broker)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker, signal.SIGTERM)
    for n, broker in running:
        terminate(broker, 10.0 if kill else STOP_TIMEOUT_S)
        with contextlib.suppress(FileNotFoundError):
            n.pid_file.unlink()
        log.info("kafka: stopped node %d pid %d", n.node_id, broker)
    return bool(running)
