"""Where the local Kafka nodes live: addresses, ports, state paths, the cluster size, jars.

Layout:
  $LLMSTREAM_CACHE_DIR/kafka-<version>/libs/        jars (Maven), `.complete` marker beside it
  $LLMSTREAM_STATE_DIR/kafka/server.properties      rendered from deploy/local/server.properties
                                                    (0600: it holds the brokers' own password)
  $LLMSTREAM_STATE_DIR/kafka/data/                  KRaft metadata + topic logs (formatted once)
  $LLMSTREAM_STATE_DIR/kafka/kafka.log              broker stdout/stderr (previous run: .log.1)
  $LLMSTREAM_STATE_DIR/kafka/kafka.pid              pid of the broker started by llmstream
  $LLMSTREAM_STATE_DIR/kafka/credentials.json       SASL/SCRAM users and passwords (0600,
                                                    generated once, before the first format)
  $LLMSTREAM_STATE_DIR/kafka/admin.properties       the admin user for Kafka's tools
  $LLMSTREAM_STATE_DIR/kafka/kcat.properties        ... and for `kcat -F` (both 0600)
  $LLMSTREAM_STATE_DIR/kafka/brokers                nodes of the cluster (absent: 1)
  $LLMSTREAM_STATE_DIR/kafka/node-<N>/              the same files for node N >= 2, with its
                                                    ports (`port`, `controller.port`)
Node 1 listens on LLMSTREAM_KAFKA_PORT; the others on free ports chosen once and remembered
(a static quorum names every controller's address, so they never move).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmstream import config

from ._common import (
    LOCAL_HOSTS,
    InfraError,
    component_dir,
    owned_pid,
    read_int,
    split_host_port,
    write_text,
)

NAME = "kafka"


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
