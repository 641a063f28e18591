"""Every Kafka client of every service is made here.

The one place for the bootstrap address and credentials (SASL), client settings that were measured (see the comments)
and timeouts; one way to read a range of offsets (worker takeover, gateway resume catch-up,
replay, tests) and one dead-letter format (worker and aggregator alike).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context

from llmstream import config

# Longest wait for one broker round trip made by our own code (metadata, offsets, a fetch).
CALL_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Connection:
    """Where the brokers are and who this process is to them. Every client gets its keyword
    arguments from `client_kwargs`.

    `auth` left out: this process's credentials (`config.kafka_auth()`:
    LLMSTREAM_KAFKA_USERNAME/PASSWORD, else the user of its principal in the infra record, else
    none), so `Connection(bootstrap)` authenticates as the service that makes it."""

    bootstrap: str
    auth: config.KafkaAuth = field(default_factory=config.kafka_auth)

    @classmethod
    def from_env(cls, principal: str | None = None, bootstrap: str | None = None) -> Connection:
        """The configured brokers, with the credentials of `principal` (default: this
        process's, `config.principal()`)."""
        return cls(bootstrap or config.kafka_bootstrap(), config.kafka_auth(principal))

    @property
    def security_protocol(self) -> str:
        return self.auth.security_protocol

    def security_kwargs(self) -> dict[str, Any]:
        """aiokafka's SASL arguments (none for PLAINTEXT)."""
        a = self.auth
        if a.security_protocol == "PLAINTEXT":
            return {}
        kwargs: dict[str, Any] = {
            "security_protocol": a.security_protocol,
            "sasl_mechanism": a.sasl_mechanism,
            "sasl_plain_username": a.username,
            "sasl_plain_password": a.password,
        }
        if a.security_protocol == "SASL_SSL":  # brokers verified against the system's CAs
            kwargs["ssl_context"] = create_ssl_context()
        return kwargs

    def client_kwargs(self, client_id: str) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap,
            "client_id": client_id,
            **self.security_kwargs(),
        }


def event_producer(
    conn: Connection, client_id: str, *, request_timeout_ms: int = 120_000
) -> AIOKafkaProducer:
    """An idempotent producer of events (prompts, tokens, dead letters): no duplicates on retry,
    acknowledged by every in-sync replica."""
    return AIOKafkaProducer(
        **conn.client_kwargs(client_id),
        enable_idempotence=True,
        acks="all",
        # Set what we mean (Kafka 4 clients default to 5 ms, KIP-1030): an event leaves at once
        # when the producer is idle (2 ms less per token at low load); under load aiokafka's one
        # request in flight per broker batches the events that arrive meanwhile anyway.
        linger_ms=0,
        # aiokafka keeps one batch per partition in flight; a larger batch lets the events of
        # many requests wait in it instead of in `send` (less CPU per event).
        max_batch_size=512 * 1024,
        # How long a batch waits for a partition leader before it fails. aiokafka's 40 s default
        # is less than a broker restart can take on a busy machine (`llmstream chaos`: stop +
        # 10 s + start took 43 s once).
        request_timeout_ms=request_timeout_ms,
    )


def group_consumer(
    conn: Connection,
    client_id: str,
    group_id: str,
    *,
    session_timeout_ms: int,
    fetch_max_wait_ms: int = 100,
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A consumer-group member that commits by hand and never skips (earliest on no offset)."""
    kwargs: dict[str, Any] = {
        **conn.client_kwargs(client_id),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # A long poll: the broker answers as soon as a record arrives, so this only bounds
        # empty fetches (10 ms cost 5% of a core per idle consumer).
        "fetch_max_wait_ms": fetch_max_wait_ms,
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": max(1000, session_timeout_ms // 4),
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(**kwargs)


def reader(
    conn: Connection,
    client_id: str,
    *,
    fetch_max_wait_ms: int = 50,
    auto_offset_reset: str = "earliest",
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A consumer outside any group: partitions assigned by hand, never commits. With sparse
    traffic `fetch_max_wait_ms` bounds the tail latency of what it reads (500 ms default: p99
    254 ms; 10 ms: 9.8 ms, measured)."""
    kwargs: dict[str, Any] = {
        **conn.client_kwargs(client_id),
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": auto_offset_reset,
        "fetch_max_wait_ms": fetch_max_wait_ms,
        "request_timeout_ms": int(CALL_TIMEOUT_S * 1000),
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(**kwargs)


def admin(conn: Connection, client_id: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        **conn.client_kwargs(client_id), request_timeout_ms=int(CALL_TIMEOUT_S * 1000)
    )


# -- reading a range of offsets -----------------------------------------------------------------


@dataclass(frozen=True)
class PartitionRange:
    tp: TopicPartition
    start: int
    end: int | None  # exclusive; None: follow the partition

    @property
    def empty(self) -> bool:
        return self.end is not None and self.start >= self.end


async def read_range(
    consumer: AIOKafkaConsumer,
    ranges: Sequence[PartitionRange],
    *,
    stop: asyncio.Event | None = None,
    max_records: int = 5000,
    poll_ms: int = 500,
) -> AsyncIterator[list[Any]]:
    """Batches of the ranges' records (each partition in offset order) until every bounded range
    is read; forever for unbounded ranges, until `stop` is set. The consumer (from `reader`) is
    assigned exactly the ranges' partitions. Transactional markers and compacted-away offsets
    leave gaps: a range ends when the position reaches its end, not on a record count."""
    active = {r.tp: r for r in ranges if not r.empty}
    if not active:
        return
    consumer.assign(list(active))
    for r in active.values():
        consumer.seek(r.tp, r.start)
    while active and not (stop is not None and stop.is_set()):
        data = await asyncio.wait_for(
            consumer.getmany(*active, timeout_ms=poll_ms, max_records=max_records),
            CALL_TIMEOUT_S + poll_ms / 1000,
        )
        out = []
        for tp, records in data.items():
            rng = active.get(tp)
            if rng is None:
                continue
            out += [rec for rec in records if rng.end is None or rec.offset < rng.end]
        if out:
            yield out
        for tp, r in list(active.items()):
            if r.end is not None and await consumer.position(tp) >= r.end:
                del active[tp]
                consumer.pause(tp)


async def end_offsets(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]) -> dict[Any, int]:
    found = await asyncio.wait_for(consumer.end_offsets(list(tps)), CALL_TIMEOUT_S)
    return {tp: int(v) for tp, v in found.items()}


# -- dead letters -----------------------------------------------------------------------------

# Headers of every dead-lettered record: why, where it came from, who parked it.
DLQ_REASON = "dlq-reason"
DLQ_SOURCE = "dlq-source"  # "<topic>/<partition>@<offset>"
DLQ_BY = "dlq-by"  # the worker id or consumer group that parked it


def dead_letter_headers(record: Any, reason: str, by: str) -> list[tuple[str, bytes]]:
    """The record's own headers (trace context among them), then ours."""
    return [
        *list(record.headers or ()),
        (DLQ_REASON, reason.encode()),
        (DLQ_SOURCE, f"{record.topic}/{record.partition}@{record.offset}".encode()),
        (DLQ_BY, by.encode()),
    ]


class DeadLetterWriter:
    """Copies a record that cannot be processed to the dead-letter topic, key and value
    unchanged, so it can be inspected and re-driven; returns once Kafka acknowledged it (the
    caller moves its offset past the record only then)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, by: str) -> None:
        self.producer = producer
        self.topic = topic
        self.by = by

    async def send(self, record: Any, reason: str) -> None:
        await self.producer.send_and_wait(
            self.topic,
            value=record.value,
            key=record.key,
            headers=dead_letter_headers(record, reason, self.by),
        )
