"""Preparing a local Kafka node: Java, the jars (Maven Central), ports, the rendered
server.properties and the KRaft storage format (with the SASL/SCRAM users bootstrapped)."""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from string import Template

from llmstream import config

from . import _kafka_auth
from ._common import (
    InfraError,
    last_error_line,
    port_free,
    read_int,
    read_text,
    repo_deploy_dir,
    run,
    write_text,
)
from ._kafka_nodes import (
    NAME,
    Node,
    jar_dir,
    kafka_dir,
    libs_dir,
    nodes,
    port,
    props_file,
    version,
)

log = logging.getLogger("llmstream_tools.infra")

MIN_JAVA = 17
MAVEN_TIMEOUT_S = 900.0
FORMAT_TIMEOUT_S = 120.0


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


def controller_port() -> int:
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


def cluster_ports() -> dict[int, tuple[int, int]]:
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


def rendered_port() -> int | None:
    """The client port in the server.properties the running broker was started with (listener
    CLIENT; PLAINTEXT in files rendered before authentication)."""
    text = read_text(props_file()) or ""
    match = re.search(r"^listeners=(?:CLIENT|PLAINTEXT)://[^:,]+:(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def render_properties(n: Node, ports: dict[int, tuple[int, int]]) -> Path:
    """`ports`: (broker, controller) port of every node, by node id. Written 0600: it holds
    the brokers' own password."""
    # A new cluster's users are generated here, before its first format; a formatted cluster
    # without them predates authentication.
    formatted = any(node.formatted for node in nodes())
    users = _kafka_auth.load() if formatted else _kafka_auth.ensure()
    if users is None:
        raise InfraError(
            NAME,
            f"the local cluster in {kafka_dir()} was formatted before Kafka authentication "
            f"(no {_kafka_auth.credentials_file().name}): its brokers cannot start with SASL users",
            f"`llmstream infra down` and delete {kafka_dir()} (its topics are lost) so "
            "`llmstream infra up` formats it again with a user per service",
        )
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
        **_kafka_auth.broker_properties(users),
    )
    extra = [kv.strip() for kv in config.get("KAFKA_EXTRA_PROPERTIES").split(";") if kv.strip()]
    if extra:
        text += "\n# LLMSTREAM_KAFKA_EXTRA_PROPERTIES\n" + "\n".join(extra) + "\n"
    write_text(n.props_file, text, mode=0o600)
    return n.props_file


def jvm(java: str, libs: Path, level: str, logs: Path) -> list[str]:
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


def new_cluster_id() -> str:
    """A random KRaft cluster id that never starts with "-": the storage tool's argument parser
    would read one that does as an option (Kafka's own Uuid.randomUuid skips those too; one
    chaos run in 64 failed to format)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def ensure_formatted(java: str, libs: Path, n: Node) -> None:
    """Format the node's KRaft storage once (kafka.tools.StorageTool format); every node of a
    cluster with the same cluster id and the same SCRAM users (KIP-900 `--add-scram`, read from
    an argument file: argparse4j's `@file`)."""
    if n.formatted:
        return
    id_file = kafka_dir() / "cluster.id"
    cluster_id = read_text(id_file)
    if not cluster_id:
        cluster_id = new_cluster_id()
        write_text(id_file, cluster_id + "\n")
    log.info("kafka: formatting KRaft storage %s (cluster id %s)", n.data_dir, cluster_id)
    with _kafka_auth.ArgFile(_kafka_auth.ensure()) as scram_users:
        cmd = [
            *jvm(java, libs, "WARN", n.dir),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(n.props_file),
            "--ignore-formatted",
            scram_users,
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
