"""A private Kafka/PostgreSQL/Redis instance for fault injection.

Faults stop and restart the broker, Redis and PostgreSQL; other tests and developers use the
shared instance of `llmstream infra up` meanwhile, so the chaos runner never touches it: it
points LLMSTREAM_STATE_DIR at a fresh directory and LLMSTREAM_KAFKA_PORT at a free port (for
this process and, through the environment, every service process it starts), so that
`llmstream_tools.infra` starts and stops servers of its own there (PostgreSQL and Redis pick free
ports above the shared ones). A fresh instance starts in ~5-10 s (initdb, KRaft format), about
what reusing one would take, so nothing is kept: everything is stopped and deleted afterwards.
Kafka jars come from the usual cache dir. With `brokers=3` Kafka is a cluster of three KRaft
nodes (replication factor 3, min.insync.replicas 2), and LLMSTREAM_KAFKA_BOOTSTRAP names all
three, so a process started while one is down still finds the others.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmstream import config
from llmstream.ports import free_port
from llmstream_tools import infra

# Settings that would point this process or its children at other servers, or give them
# credentials other than the private instance's (recorded in its infra.json, a user per
# service: the children authenticate as themselves).
_EXTERNAL = (
    "KAFKA_BOOTSTRAP",
    "DATABASE_URL",
    "REDIS_URL",
    "KAFKA_USERNAME",
    "KAFKA_PASSWORD",
    "KAFKA_SECURITY_PROTOCOL",
)


@dataclass
class PrivateInfra:
    state_dir: Path
    kafka_port: int
    bootstrap: str


@contextlib.contextmanager
def private_infra(
    parent: Path | None = None, keep_logs: Path | None = None, brokers: int = 1
) -> Iterator[PrivateInfra]:
    """Start a private instance; os.environ points at it until the block ends. The servers'
    logs are copied to `keep_logs/infra-<component>.log` before the state dir is deleted."""
    names = ["STATE_DIR", "KAFKA_PORT", *_EXTERNAL]
    saved = {n: os.environ.get(config.PREFIX + n) for n in names}
    state = Path(tempfile.mkdtemp(prefix="llmstream-chaos-", dir=parent))
    port = free_port()
    for n in _EXTERNAL:
        os.environ.pop(config.PREFIX + n, None)
    os.environ[config.PREFIX + "STATE_DIR"] = str(state)
    os.environ[config.PREFIX + "KAFKA_PORT"] = str(port)
    try:
        infra.up(brokers=brokers)
        bootstrap = infra.kafka_bootstrap()
        os.environ[config.PREFIX + "KAFKA_BOOTSTRAP"] = bootstrap
        yield PrivateInfra(state, port, bootstrap)
    finally:
        try:
            # Only what was started under this state dir: `down` never touches other servers.
            infra.down()
        finally:
            for n, value in saved.items():
                if value is None:
                    os.environ.pop(config.PREFIX + n, None)
                else:
                    os.environ[config.PREFIX + n] = value
            if keep_logs is not None:
                for log in [*state.glob("*/*.log*"), *state.glob("kafka/node-*/*.log*")]:
                    name = "-".join(log.relative_to(state).parts)
                    with contextlib.suppress(OSError):
                        shutil.copy(log, keep_logs / f"infra-{name}")
            shutil.rmtree(state, ignore_errors=True)
