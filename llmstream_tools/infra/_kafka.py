"""Local Apache Kafka (KRaft, every node a combined broker + controller) from Maven Central jars:
one node by default, or a cluster of N (`llmstream infra up --brokers 3`: replication factor 3,
`min.insync.replicas=2`, a static quorum of N controllers) to test broker failures.

Layout:
  $LLMSTREAM_CACHE_DIR/kafka-<version>/libs/        jars (Maven), `.complete` marker beside it
  $LLMSTREAM_STATE_DIR/kafka/server.properties      rendered from deploy/local/server.properties
  $LLMSTREAM_STATE_DIR/kafka/data/                  KRaft metadata + topic logs (formatted once)
  $LLMSTREAM_STATE_DIR/kafka/kafka.log              broker stdout/stderr (previous run: .log.1)
  $LLMSTREAM_STATE_DIR/kafka/kafka.pid              pid of the broker started by llmstream
  $LLMSTREAM_STATE_DIR/kafka/brokers                nodes of the cluster (absent: 1)
  $LLMSTREAM_STATE_DIR/kafka/node-<N>/              the same files for node N >= 2, with its
                                                    ports (`port`, `controller.port`)
Node 1 listens on LLMSTREAM_KAFKA_PORT; the others on free ports chosen once and remembered
(a static quorum names every controller's address, so they never move).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template

from llmstream import config

from ._common import (
    LOCAL_HOSTS,
    ComponentStatus,
    InfraError,
    component_dir,
    kafka_api_versions,
    kill_hard,
    last_error_line,
    log_hint,
    owned_pid,
    pid_alive,
    port_free,
    port_free_soon,
    read_int,
    read_text,
    repo_deploy_dir,
    rotate_log,
    run,
    run_async,
    running_state,
    split_host_port,
    startup_timeout,
    terminate,
    write_text,
)

log = logging.getLogger("llmstream_tools.infra")

NAME = "kafka"
MIN_JAVA = 17
MAVEN_TIMEOUT_S = 900.0
FORMAT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

# Popen objects of brokers started by this process (kept so they are not reported as leaked).
_children: list[subprocess.Popen[bytes]] = []


# --------------------------------------------------------------------------- addresses


def port() -> int:
    return config.get_int("KAFKA_PORT")


def local_address() -> str:
    return f"127.0.0.1:{port()}"


def local_addresses() -> list[str]:
    """Every node's address (node 1 first); nodes whose ports are not chosen yet are left out."""
    return [n.address for n in nodes() if n.port is not None]


def bootstrap() -> str:
    """LLMSTREAM_KAFKA_BOOTSTRAP if set, else every local node (node 1: LLMSTREAM_KAFKA_PORT)."""
    if os.environ.get(config.PREFIX + "KAFKA_BOOTSTRAP", "").strip() or brokers() == 1:
        return config.kafka_bootstrap()
    return ",".join(local_addresses())


def is_external() -> bool:
    """True if LLMSTREAM_KAFKA_BOOTSTRAP names anything but the local nodes."""
    servers = [s.strip() for s in bootstrap().split(",") if s.strip()]
    if not servers:
        return True
    local = {split_host_port(a, 9092) for a in local_addresses()}
    for server in servers:
        host, p = split_host_port(server, 9092)
        if host not in LOCAL_HOSTS or ("127.0.0.1", p) not in local:
            return True
    return False


# --------------------------------------------------------------------------- paths


def kafka_dir() -> Path:
    return component_dir(NAME)


def brokers() -> int:
    """Nodes of the local cluster: what `infra up --brokers N` recorded (1 by default)."""
    return read_int(kafka_dir() / "brokers") or 1


def set_brokers(count: int) -> None:
    """Record the cluster size before the first start; a formatted cluster keeps its own."""
    if count < 1:
        raise InfraError(NAME, f"--brokers {count}: at least one broker", "use 1 or 3")
    if count == brokers():
        return
    if any(n.formatted for n in nodes()):
        raise InfraError(
            NAME,
            f"the local cluster in {kafka_dir()} was formatted with {brokers()} broker(s), "
            f"not {count}",
            f"use another LLMSTREAM_STATE_DIR, or `llmstream infra down` and delete "
            f"{kafka_dir()} to start from scratch",
        )
    write_text(kafka_dir() / "brokers", f"{count}\n")


@dataclass(frozen=True)
class Node:
    """One KRaft node (combined broker + controller). Node 1 keeps the single-node layout."""

    node_id: int

    @property
    def dir(self) -> Path:
        return kafka_dir() if self.node_id == 1 else kafka_dir() / f"node-{self.node_id}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "kafka.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "kafka.log"

    @property
    def props_file(self) -> Path:
        return self.dir / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def formatted(self) -> bool:
        return (self.data_dir / "meta.properties").exists()

    @property
    def port(self) -> int | None:
        return port() if self.node_id == 1 else read_int(self.dir / "port")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        """Pid of this node's broker, if llmstream started it and it is alive."""
        # The command line holds the path of its server.properties: unique per node.
        return owned_pid(self.pid_file, f"kafka.Kafka {self.props_file}")


def nodes() -> list[Node]:
    return [Node(i) for i in range(1, brokers() + 1)]


def node(node_id: int) -> Node:
    if not 1 <= node_id <= brokers():
        raise InfraError(NAME, f"no node {node_id} in a cluster of {brokers()}", "")
    return Node(node_id)


# Node 1 under its single-node names (status, tests, `infra.kafka_pid`).
def pid_file() -> Path:
    return Node(1).pid_file


def log_file() -> Path:
    return Node(1).log_file


def props_file() -> Path:
    return Node(1).props_file


def data_dir() -> Path:
    return Node(1).data_dir


def version() -> str:
    return config.get("KAFKA_VERSION").strip()


def jar_dir() -> Path:
    return config.cache_dir() / f"kafka-{version()}"


def libs_dir() -> Path:
    return jar_dir() / "libs"


def pid() -> int | None:
    """Pid of node 1's broker llmstream started for this state dir, if it is alive."""
    return Node(1).pid()


# --------------------------------------------------------------------------- probes


async def _metadata(servers: str, timeout_s: float) -> int:
    """Bootstrap an aiokafka client (a real Metadata request); returns the number of brokers."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(
        bootstrap_servers=servers,
        client_id="llmstream-infra",
        request_timeout_ms=max(int(timeout_s * 1000), 1000),
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
    detail = f"Kafka {version()} KRaft, data {data_dir()}"
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
    detail = f"Kafka {version()} KRaft, {len(pids)} nodes, pids " + ", ".join(
        f"{i}:{p or '-'}" for i, p in pids.items()
    )
    first = pids[1]
    if len(up) == len(pids) and first is not None:
        state = running_state(first)
    elif up:
        state = f"degraded ({len(up)} of {len(pids)} brokers running)"
    else:
        state = "stopped"
    return ComponentStatus(NAME, bootstrap(), state, first, str(log_file()), detail)


# --------------------------------------------------------------------------- prerequisites


def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise InfraError(
            NAME, "java not found", "install OpenJDK 17+ (apt-get install openjdk-17-jre-headless)"
        )
    result = run([java, "-version"], 30.0)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.output)
    if result.returncode != 0 or match is None:
        raise InfraError(
            NAME,
            f"`{java} -version` failed: {last_error_line(result.output)}",
            "install OpenJDK 17+ (apt-get install openjdk-17-jre-headless)",
        )
    major = int(match.group(1))
    if major == 1 and match.group(2):  # 1.8 -> 8
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise InfraError(
            NAME,
            f"{java} is Java {major}, Kafka {version()} needs Java {MIN_JAVA}+",
            "install OpenJDK 17+ (apt-get install openjdk-17-jre-headless) and put it first on "
            "PATH",
        )
    return java


def ensure_jars() -> Path:
    """Fetch kafka_2.13:<version> and its runtime dependencies with Maven (once)."""
    libs = libs_dir()
    marker = jar_dir() / ".complete"
    main_jar = f"kafka_2.13-{version()}.jar"
    if marker.exists() and (libs / main_jar).exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(
            NAME,
            f"jars of Kafka {version()} are not cached in {libs} and Maven (mvn) is not installed",
            "install Maven (apt-get install maven); Maven Central must be reachable",
        )
    pom = repo_deploy_dir() / "pom.xml"
    if not pom.exists():
        raise InfraError(NAME, f"{pom} is missing", "run from a checkout of the llmstream repo")
    jar_dir().mkdir(parents=True, exist_ok=True)
    tmp = jar_dir() / f"libs.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("kafka: fetching Kafka %s jars from Maven Central into %s", version(), libs)
    started = time.monotonic()
    result = run(
        [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-U",  # retry artifacts whose earlier download failed (Maven caches failures)
            "-f",
            str(pom),
            f"-Dkafka.version={version()}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
        ],
        MAVEN_TIMEOUT_S,
    )
    if result.returncode != 0 or not (tmp / main_jar).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        if result.timed_out:
            cause = f"timed out after {MAVEN_TIMEOUT_S:.0f} s"
        else:
            cause = last_error_line(result.output, r"\[ERROR\]|error|could not")
            # "[ERROR] Failed to execute goal ...: Could not resolve ...: Could not find X in
            # central (...)": the last "Could not" is the useful part.
            cause = cause[cause.rfind("Could not ") :] if "Could not " in cause else cause
            cause = re.sub(r"^Could not resolve dependencies for project \S+: ", "", cause)
            cause = re.sub(r"\s*-> \[Help \d+\]$", "", cause)
        raise InfraError(
            NAME,
            f"Maven could not fetch org.apache.kafka:kafka_2.13:{version()}: {cause}",
            "Maven Central must be reachable (check network, proxy, ~/.m2/settings.xml) and "
            "LLMSTREAM_KAFKA_VERSION must exist there",
        )
    shutil.rmtree(libs, ignore_errors=True)
    os.replace(tmp, libs)
    jars = sorted(p.name for p in libs.glob("*.jar"))
    write_text(marker, "\n".join(jars) + "\n")
    log.info("kafka: %d jars fetched in %.1f s", len(jars), time.monotonic() - started)
    return libs


def _controller_port() -> int:
    """Single node's controller port: remembered, else KAFKA_PORT+1 upward (a static quorum of
    one voter may change address between starts without reformatting)."""
    remembered = kafka_dir() / "controller.port"
    previous = read_int(remembered)
    if previous is not None and previous != port() and port_free(previous):
        return previous
    for candidate in range(port() + 1, min(port() + 200, 65536)):
        if port_free(candidate):
            write_text(remembered, f"{candidate}\n")
            return candidate
    raise InfraError(NAME, f"no free port for the controller above {port()}", "free one")


def _cluster_ports() -> dict[int, tuple[int, int]]:
    """(broker port, controller port) of every node of a cluster: chosen once, remembered.

    Every node's properties name every controller, so a port never changes afterwards."""
    files = {
        n.node_id: (None if n.node_id == 1 else n.dir / "port", n.dir / "controller.port")
        for n in nodes()
    }
    taken = {port()} | {
        value for pair in files.values() for f in pair if f and (value := read_int(f))
    }
    out: dict[int, tuple[int, int]] = {}
    candidate = port() + 1
    for node_id, pair in files.items():
        chosen = []
        for f in pair:
            value = port() if f is None else read_int(f)
            while value is None:
                if candidate not in taken and port_free(candidate):
                    value = candidate
                    taken.add(value)
                    assert f is not None
                    write_text(f, f"{value}\n")
                candidate += 1
                if candidate >= 65536:
                    raise InfraError(NAME, f"no free ports above {port()}", "free some")
            chosen.append(value)
        out[node_id] = (chosen[0], chosen[1])
    return out


def _rendered_port() -> int | None:
    """The PLAINTEXT port in the server.properties the running broker was started with."""
    text = read_text(props_file()) or ""
    match = re.search(r"^listeners=.*PLAINTEXT://[^:,]+:(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def render_properties(n: Node, ports: dict[int, tuple[int, int]]) -> Path:
    """`ports`: (broker, controller) port of every node, by node id."""
    replication = min(3, len(ports))
    template = Template((repo_deploy_dir() / "server.properties").read_text())
    text = template.substitute(
        node_id=n.node_id,
        port=ports[n.node_id][0],
        controller_port=ports[n.node_id][1],
        voters=",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in sorted(ports.items())),
        replication=replication,
        # With 3 replicas, an acknowledged write is on 2 nodes: one may die without loss.
        min_isr=2 if replication >= 3 else 1,
        broker_session_timeout_ms=5000 if len(ports) == 1 else 3000,
        broker_heartbeat_ms=1000 if len(ports) == 1 else 500,
        log_dir=str(n.data_dir),
    )
    extra = [kv.strip() for kv in config.get("KAFKA_EXTRA_PROPERTIES").split(";") if kv.strip()]
    if extra:
        text += "\n# LLMSTREAM_KAFKA_EXTRA_PROPERTIES\n" + "\n".join(extra) + "\n"
    write_text(n.props_file, text)
    return n.props_file


def _jvm(java: str, libs: Path, level: str, logs: Path) -> list[str]:
    return [
        java,
        f"-Xmx{config.get('KAFKA_HEAP')}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={repo_deploy_dir() / 'log4j2.yaml'}",
        f"-Dllmstream.log.level={level}",
        f"-Dkafka.logs.dir={logs}",
        "-cp",
        f"{libs}/*",
    ]


def ensure_formatted(java: str, libs: Path, n: Node) -> None:
    """Format the node's KRaft storage once (kafka.tools.StorageTool format); every node of a
    cluster with the same cluster id."""
    if n.formatted:
        return
    id_file = kafka_dir() / "cluster.id"
    cluster_id = read_text(id_file)
    if not cluster_id:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        write_text(id_file, cluster_id + "\n")
    log.info("kafka: formatting KRaft storage %s (cluster id %s)", n.data_dir, cluster_id)
    cmd = [
        *_jvm(java, libs, "WARN", n.dir),
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(n.props_file),
        "--ignore-formatted",
    ]
    result = run(cmd, FORMAT_TIMEOUT_S, cwd=n.dir)
    if result.returncode != 0 or not n.formatted:
        cause = "timed out" if result.timed_out else last_error_line(result.output)
        raise InfraError(
            NAME,
            f"formatting KRaft storage {n.data_dir} failed: {cause}",
            f"check {n.props_file} (and LLMSTREAM_KAFKA_EXTRA_PROPERTIES), or delete "
            f"{n.data_dir} to start from scratch",
        )


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
    cmd = [*_jvm(java, libs, "INFO", n.dir), "kafka.Kafka", str(n.props_file)]
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
        running_port = _rendered_port()
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
    render_properties(first, {1: (port(), _controller_port())})
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
    ports = _cluster_ports()
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
