"""Local single-node Apache Kafka (KRaft, combined broker + controller) from Maven Central jars.

Layout:
  $LLMSTREAM_CACHE_DIR/kafka-<version>/libs/        jars (Maven), `.complete` marker beside it
  $LLMSTREAM_STATE_DIR/kafka/server.properties      rendered from deploy/local/server.properties
  $LLMSTREAM_STATE_DIR/kafka/data/                  KRaft metadata + topic logs (formatted once)
  $LLMSTREAM_STATE_DIR/kafka/kafka.log              broker stdout/stderr (previous run: .log.1)
  $LLMSTREAM_STATE_DIR/kafka/kafka.pid              pid of the broker started by llmstream
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
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


def bootstrap() -> str:
    """LLMSTREAM_KAFKA_BOOTSTRAP if set, else the local broker on LLMSTREAM_KAFKA_PORT."""
    return config.kafka_bootstrap()


def is_external() -> bool:
    """True if LLMSTREAM_KAFKA_BOOTSTRAP names something other than the local broker's port."""
    servers = [s for s in bootstrap().split(",") if s.strip()]
    if len(servers) != 1:
        return True
    host, p = split_host_port(servers[0], 9092)
    return host not in LOCAL_HOSTS or p != port()


# --------------------------------------------------------------------------- paths


def kafka_dir() -> Path:
    return component_dir(NAME)


def pid_file() -> Path:
    return kafka_dir() / "kafka.pid"


def log_file() -> Path:
    return kafka_dir() / "kafka.log"


def props_file() -> Path:
    return kafka_dir() / "server.properties"


def data_dir() -> Path:
    return kafka_dir() / "data"


def version() -> str:
    return config.get("KAFKA_VERSION").strip()


def jar_dir() -> Path:
    return config.cache_dir() / f"kafka-{version()}"


def libs_dir() -> Path:
    return jar_dir() / "libs"


def _marker() -> str:
    # The broker's command line contains the path of its server.properties: unique per state dir.
    return f"kafka.Kafka {props_file()}"


def pid() -> int | None:
    """Pid of the broker llmstream started for this state dir, if it is alive."""
    return owned_pid(pid_file(), _marker())


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


def metadata_error(servers: str, timeout_s: float = 10.0) -> str | None:
    """None if a Metadata request to servers succeeds with at least one broker, else the cause."""
    try:
        brokers = run_async(lambda: _metadata(servers, timeout_s), timeout_s)
    except TimeoutError:
        return f"no answer within {timeout_s:.0f} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if brokers > 0 else "metadata lists no brokers"


# --------------------------------------------------------------------------- status


def status() -> ComponentStatus:
    if is_external():
        error = metadata_error(bootstrap(), 5.0)
        state = "running (external)" if error is None else "unreachable (external)"
        return ComponentStatus(NAME, bootstrap(), state, detail=error or "")
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
    """Controller listener port: remembered, else KAFKA_PORT+1 upward (static quorum)."""
    remembered = kafka_dir() / "controller.port"
    previous = read_int(remembered)
    if previous is not None and previous != port() and port_free(previous):
        return previous
    for candidate in range(port() + 1, min(port() + 200, 65536)):
        if port_free(candidate):
            write_text(remembered, f"{candidate}\n")
            return candidate
    raise InfraError(NAME, f"no free port for the controller above {port()}", "free one")


def _rendered_port() -> int | None:
    """The PLAINTEXT port in the server.properties the running broker was started with."""
    text = read_text(props_file()) or ""
    match = re.search(r"^listeners=.*PLAINTEXT://[^:,]+:(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def render_properties(controller_port: int) -> Path:
    template = Template((repo_deploy_dir() / "server.properties").read_text())
    text = template.substitute(
        port=port(), controller_port=controller_port, log_dir=str(data_dir())
    )
    extra = [kv.strip() for kv in config.get("KAFKA_EXTRA_PROPERTIES").split(";") if kv.strip()]
    if extra:
        text += "\n# LLMSTREAM_KAFKA_EXTRA_PROPERTIES\n" + "\n".join(extra) + "\n"
    write_text(props_file(), text)
    return props_file()


def _jvm(java: str, libs: Path, level: str) -> list[str]:
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
        f"-Dkafka.logs.dir={kafka_dir()}",
        "-cp",
        f"{libs}/*",
    ]


def ensure_formatted(java: str, libs: Path) -> None:
    """Format the KRaft storage once (kafka.tools.StorageTool format)."""
    if (data_dir() / "meta.properties").exists():
        return
    id_file = kafka_dir() / "cluster.id"
    cluster_id = read_text(id_file)
    if not cluster_id:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        write_text(id_file, cluster_id + "\n")
    log.info("kafka: formatting KRaft storage %s (cluster id %s)", data_dir(), cluster_id)
    cmd = [
        *_jvm(java, libs, "WARN"),
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(props_file()),
        "--ignore-formatted",
    ]
    result = run(cmd, FORMAT_TIMEOUT_S, cwd=kafka_dir())
    if result.returncode != 0 or not (data_dir() / "meta.properties").exists():
        cause = "timed out" if result.timed_out else last_error_line(result.output)
        raise InfraError(
            NAME,
            f"formatting KRaft storage {data_dir()} failed: {cause}",
            f"check {props_file()} (and LLMSTREAM_KAFKA_EXTRA_PROPERTIES), or delete "
            f"{data_dir()} to start from scratch",
        )


# --------------------------------------------------------------------------- lifecycle


def _wait_ready(broker: int, timeout: float, started_here: bool) -> None:
    """Until the broker answers ApiVersions and a real Metadata request (aiokafka bootstrap)."""
    deadline = time.monotonic() + timeout
    address = local_address()
    last_error = "not listening yet"
    while True:
        if not pid_alive(broker):
            with contextlib.suppress(FileNotFoundError):
                pid_file().unlink()
            raise InfraError(
                NAME,
                f"the broker (pid {broker}) exited during startup",
                f"{log_hint(log_file())}; fix the cause (LLMSTREAM_KAFKA_EXTRA_PROPERTIES, "
                f"ports, disk) and run `llmstream infra up` again",
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if started_here:
                log.warning("kafka: stopping broker pid %d that did not become ready", broker)
                terminate(broker, 10.0)
                with contextlib.suppress(FileNotFoundError):
                    pid_file().unlink()
            raise InfraError(
                NAME,
                f"the broker did not answer on {address} within {timeout:.0f} s ({last_error})",
                f"{log_hint(log_file())}; raise LLMSTREAM_STARTUP_TIMEOUT_S or run "
                "`llmstream infra down` and retry",
            )
        if kafka_api_versions("127.0.0.1", port(), min(2.0, max(remaining, 0.1))):
            error = metadata_error(address, min(10.0, max(remaining, 0.5)))
            if error is None:
                return
            last_error = error
        time.sleep(min(0.2, max(remaining, 0.01)))


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

    timeout = startup_timeout()
    broker = pid()
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
            _wait_ready(broker, timeout, started_here=False)
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
    render_properties(_controller_port())
    ensure_formatted(java, libs)

    rotate_log(log_file())
    cmd = [*_jvm(java, libs, "INFO"), "kafka.Kafka", str(props_file())]
    with open(log_file(), "ab") as out:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=kafka_dir(),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise InfraError(
                NAME, f"cannot start {java}: {exc}", "check the Java install"
            ) from None
    _children.append(proc)
    write_text(pid_file(), f"{proc.pid}\n")
    log.info("kafka: started broker pid %d on %s (log %s)", proc.pid, local_address(), log_file())

    def wait() -> ComponentStatus:
        _wait_ready(proc.pid, timeout, started_here=True)
        return status()

    return wait


def up() -> ComponentStatus:
    return begin_up()()


def stop(kill: bool = False) -> bool:
    """Stop the broker llmstream started (SIGTERM: controlled shutdown; kill: SIGKILL now)."""
    broker = pid()
    if broker is None:
        return False
    if kill:
        kill_hard(broker)
        terminate(broker, 10.0)
    else:
        terminate(broker, STOP_TIMEOUT_S)
    with contextlib.suppress(FileNotFoundError):
        pid_file().unlink()
    log.info("kafka: stopped broker pid %d", broker)
    return True
