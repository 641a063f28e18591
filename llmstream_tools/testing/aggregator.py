"""Helpers for the aggregator's integration tests and benchmark: fresh topics and databases on
the real servers, producing synthetic traffic, waiting for the projection to catch up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psycopg
from aiokafka import AIOKafkaProducer
from psycopg.conninfo import make_conninfo

from llmstream import codec, kafka, migrate
from llmstream_tools import stack
from llmstream_tools.testing.synthetic_events import Produced


@dataclass(frozen=True)
class Topics:
    prompts: str
    tokens: str
    dlq: str

    @property
    def both(self) -> list[str]:
        return [self.prompts, self.tokens]


@asynccontextmanager
async def fresh_topics(bootstrap: str, partitions: int = 3) -> AsyncIterator[Topics]:
    base = f"test.agg.{uuid.uuid4().hex[:10]}"
    t = Topics(f"{base}.prompts", f"{base}.tokens", f"{base}.dlq")
    await stack.create_topics(bootstrap, {t.prompts: partitions, t.tokens: partitions, t.dlq: 1})
    yield t
    await stack.delete_topics(bootstrap, [t.prompts, t.tokens, t.dlq])


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new migrated database on the server of `server_url`; dropped afterwards."""
    name = f"llmstream_agg_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(
        server_url, autocommit=True, connect_timeout=10
    ) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"'.encode())
    url = make_conninfo(server_url, dbname=name)
    try:
        await migrate.apply(url)
        yield url
    finally:
        async with await psycopg.AsyncConnection.connect(
            server_url, autocommit=True, connect_timeout=10
        ) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


async def new_producer(bootstrap: str, linger_ms: int = 5) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(
        **kafka.Connection(bootstrap).client_kwargs("test-aggregator-harness"),
        enable_idempotence=True,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=15000,
    )
    await asyncio.wait_for(producer.start(), 15)
    return producer


async def produce(producer: AIOKafkaProducer, items: Iterable[Produced], window: int = 5000) -> int:
    """Send events (key = request id, codec headers); waits for every acknowledgement."""
    pending: list[asyncio.Future[object]] = []
    n = 0
    for item in items:
        e = item.event
        pending.append(
            await producer.send(
                item.topic, codec.encode(e), key=codec.key(e), headers=codec.headers(e)
            )
        )
        n += 1
        if len(pending) >= window:
            await asyncio.wait_for(asyncio.gather(*pending), 60)
            pending.clear()
    if pending:
        await asyncio.wait_for(asyncio.gather(*pending), 60)
    return n


async def end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **kafka.Connection(bootstrap).client_kwargs("test-aggregator-harness"),
        request_timeout_ms=10000,
    )
    await asyncio.wait_for(consumer.start(), 15)
    try:
        tps = []
        for topic in topics:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await asyncio.wait_for(consumer._client.force_metadata_update(), 10)
                parts = consumer.partitions_for_topic(topic) or set()
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        ends = await asyncio.wait_for(consumer.end_offsets(tps), 15)
        return {(tp.topic, tp.partition): int(o) for tp, o in ends.items()}
    finally:
        await consumer.stop()


async def stored_offsets(database_url: str, group: str) -> dict[tuple[str, int], int]:
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=10) as conn:
        cur = await conn.execute(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
            (group,),
        )
        return {(t, p): o for t, p, o in await cur.fetchall()}


async def wait_caught_up(
    bootstrap: str, database_url: str, group: str, topics: Iterable[str], timeout_s: float = 60
) -> float:
    """Wait until the offsets stored in PostgreSQL reach the topics' end offsets; returns the
    seconds waited."""
    topics = list(topics)
    ends = {k: v for k, v in (await end_offsets(bootstrap, topics)).items() if v > 0}
    start = time.monotonic()
    while True:
        stored = await stored_offsets(database_url, group)
        if all(stored.get(k, 0) >= v for k, v in ends.items()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            behind = {f"{t}/{p}": (stored.get((t, p), 0), v) for (t, p), v in ends.items()}
            raise TimeoutError(f"projection not caught up after {timeout_s}s: {behind}")
        await asyncio.sleep(0.2)
