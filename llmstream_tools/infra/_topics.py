"""Creation and verification of the event topics (aiokafka admin client, no JVM)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from llmstream import config
from llmstream.topics import TopicSpec, specs

from . import _kafka, _kafka_auth
from ._common import InfraError, run_async

log = logging.getLogger("llmstream_tools.infra")

TOPIC_ALREADY_EXISTS = 36
TIMEOUT_S = 30.0


def _partition_counts(topics: list[dict[str, Any]]) -> dict[str, int]:
    return {
        str(t["topic"]): len(t["partitions"])
        for t in topics
        if t.get("error_code", 0) == 0 and t.get("partitions")
    }


def _configs(spec: TopicSpec, replication: int) -> dict[str, str]:
    if spec.compacted:
        configs = {
            "cleanup.policy": "compact",
            # Only closed segments are compacted: a 10-minute segment bounds what a reader
            # starting from the beginning reads beyond the last record per key (the 7-day
            # default would let every re-announcement of a week pile up).
            "segment.ms": "600000",
        }
    else:
        configs = {
            "retention.ms": str(config.get_int("TOPIC_RETENTION_MS")),
            "cleanup.policy": "delete",
        }
    if replication >= 3:
        configs["min.insync.replicas"] = "2"
    return configs


async def _ensure(servers: str, wanted: list[TopicSpec]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(
        bootstrap_servers=servers,
        client_id="llmstream-infra",
        request_timeout_ms=15000,
        **_kafka_auth.client_kwargs(),
    )
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        replication = max(1, min(3, len(cluster.get("brokers", []))))
        existing = set(await admin.list_topics())  # all topics: never auto-creates
        missing = [s for s in wanted if s.name not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        s.name, s.partitions, replication, topic_configs=_configs(s, replication)
                    )
                    for s in missing
                ]
            )
            for entry in response.topic_errors:
                topic, code = entry[0], entry[1]
                message = entry[2] if len(entry) > 2 else ""
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise InfraError(
                        "kafka",
                        f"creating topic {topic} failed (error {code}: {message})",
                        "check the broker log and the topic settings",
                    )
            for s in missing:
                log.info("kafka: created topic %s (%d partitions)", s.name, s.partitions)
        names = [s.name for s in wanted]
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            counts = _partition_counts(await admin.describe_topics(names))
            if all(name in counts for name in names):
                break
            if time.monotonic() > deadline:
                absent = ", ".join(n for n in names if n not in counts)
                raise InfraError(
                    "kafka",
                    f"topics {absent} do not appear in the metadata {TIMEOUT_S:.0f} s after "
                    "creation",
                    "check the broker log",
                )
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    for s in wanted:
        if counts[s.name] < s.partitions:
            raise InfraError(
                "kafka",
                f"topic {s.name} has {counts[s.name]} partitions, fewer than the {s.partitions} "
                f"set by {config.PREFIX}{s.partitions_setting}",
                f"add partitions (kafka-topics.sh --alter --topic {s.name} --partitions "
                f"{s.partitions}), delete the topic, or lower {config.PREFIX}{s.partitions_setting}",
            )
        if counts[s.name] > s.partitions:
            log.info(
                "kafka: topic %s has %d partitions (more than the %d configured); keeping them",
                s.name,
                counts[s.name],
                s.partitions,
            )


def ensure_topics() -> None:
    servers = _kafka.bootstrap()
    wanted = specs()
    try:
        run_async(lambda: _ensure(servers, wanted), TIMEOUT_S + 20)
    except InfraError:
        raise
    except TimeoutError:
        raise InfraError(
            "kafka",
            f"creating topics on {servers} took over {TIMEOUT_S + 20:.0f} s",
            "check that the broker is healthy (`llmstream infra status`)",
        ) from None
    except Exception as exc:
        raise InfraError(
            "kafka",
            f"cannot create topics on {servers} ({type(exc).__name__}: {exc})",
            "run `llmstream infra up` or check LLMSTREAM_KAFKA_BOOTSTRAP",
        ) from None
