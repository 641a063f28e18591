"""The 3-broker KRaft cluster of `llmstream infra up --brokers 3` (llmstream_tools/infra/_kafka.py),
as the chaos suite's private instance uses it: three combined broker+controller nodes, the
bootstrap naming all three, topics with 3 replicas and min.insync.replicas 2, and one node
killed with kill -9 while the other two keep taking acknowledged writes, then started again. The shared instance is
never touched."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from llmstream import topics
from llmstream.config import ADMIN
from llmstream.kafka import Connection
from llmstream_tools import infra
from llmstream_tools.chaos.infra import private_infra

pytestmark = pytest.mark.integration


async def _describe(bootstrap: str, topic: str) -> tuple[list[list[int]], str]:
    """Each partition's replicas, and the topic's min.insync.replicas."""
    admin = AIOKafkaAdminClient(**Connection.from_env(ADMIN, bootstrap).client_kwargs("test"))
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        (config,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})]
        )
    finally:
        await admin.close()
    replicas = [sorted(p["replicas"]) for p in described["partitions"]]
    (entry,) = [c for c in config.resources[0][4] if c[0] == "min.insync.replicas"]
    return replicas, str(entry[1])


async def test_a_three_broker_cluster_survives_a_node_killed_and_restarted() -> None:
    shared_before = [(c.name, c.pid) for c in infra.status()]
    # Under /tmp itself: PostgreSQL's socket path must stay short.
    with private_infra(brokers=3) as private:
        nodes = infra.kafka_nodes()
        assert [n.node_id for n in nodes] == [1, 2, 3] and all(n.pid for n in nodes)
        assert private.bootstrap.split(",") == [n.address for n in nodes]
        (kafka,) = [s for s in infra.status() if s.name == "kafka"]
        assert kafka.running and "3 nodes" in kafka.detail

        await asyncio.to_thread(infra.ensure_topics)
        tokens = topics.specs()[1].name
        replicas, min_isr = await _describe(private.bootstrap, tokens)
        assert replicas and all(r == [1, 2, 3] for r in replicas) and min_isr == "2"

        assert infra.stop_kafka_node(2, kill=True)
        (kafka,) = [s for s in infra.status() if s.name == "kafka"]
        assert kafka.state.startswith("degraded (2 of 3")
        # Two nodes keep a controller quorum and min.insync.replicas: a write acknowledged by
        # every in-sync replica still goes through (once the dead node's partitions moved).
        conn = Connection.from_env(ADMIN, private.bootstrap)
        producer = AIOKafkaProducer(
            **conn.client_kwargs("test"), acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            sent = await asyncio.wait_for(producer.send_and_wait(tokens, b"v", key=b"k"), 60)
        finally:
            await producer.stop()
        assert sent.offset >= 0
        restarted = await asyncio.to_thread(infra.start_kafka_node, 2)
        assert restarted.running and infra.kafka_nodes()[1].pid not in (None, nodes[1].pid)
    assert [(c.name, c.pid) for c in infra.status()] == shared_before
