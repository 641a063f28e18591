"""Kafka client on the hot path: aiokafka vs confluent-kafka (librdkafka), side by side, and what
a token event carries, byte by byte (issue 21).

    llmstream bench kafka-clients [--kc-records 10000] [--kc-rates 200 2000] [--kc-seconds 1.5]
                                  [--kc-repeat 3]

Against the broker of `llmstream infra up`, on topics of its own (created, then deleted):

1. produce / fetch at backlog: `--kc-records` real token events (llmstream.codec: a 1-token
   delta and a coalesced 8-token delta, each with and without the trace context) keyed by 64
   request ids over 4 partitions, sent without waiting in between (like many streams' emitters),
   then read back by a reader assigned to those partitions (like the gateway's); produced again
   at linger 5 ms; and, for librdkafka, `produce()` alone without a future per record (its
   floor from Python). CPU per record of the whole process (every thread: librdkafka's are
   counted) and of the event loop's thread, records/s.
2. low rate: one stream of 1-token deltas with the trace context, paced at each `--kc-rates`
   for `--kc-seconds`, producer and reader in this process: produce -> fetch latency p50/p99 and
   CPU per record (both sides, idle polling included), at linger 0 ms (ours) and 5 ms (the
   Kafka 4 producer default, KIP-1030).
3. record size (computed, nothing sent): bytes per token of today's token event and after each
   proposed cut, cumulative.

The clients alternate (aiokafka first in repeats 1, 3, ..., confluent-kafka in 2, 4, ...), so
load from elsewhere on the shared machine hits both; every figure is the median of the repeats
and every ratio (confluent-kafka / aiokafka) the median of the per-repeat ratios.

What an asyncio service would pay for librdkafka is measured, not its C speed alone:
confluent-kafka has no event-loop integration that fits us (`confluent_kafka.aio.AIOProducer` refuses
record headers and holds records until 1,000 are buffered or 1 s passed;
`AIOConsumer.consume(n, timeout)` returns only when n records or the timeout arrived, one
thread-pool hop per call). So the adapters below do what a service would: `produce()` on the
loop thread (it only enqueues), delivery reports served by a thread blocked in `poll()` and
handed to the loop in one `call_soon_threadsafe` per poll; a fetch thread that blocks in
`poll()` for the first record, takes what else is ready with `consume(n, 0)` and hands the batch
over. Both sides touch what the gateway reads of a record (key, value, offset; not headers).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import os
import queue
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, get_args

import aiokafka
from aiokafka import AIOKafkaProducer, TopicPartition

from llmstream import codec, config, kafka
from llmstream.v1 import events_pb2
from llmstream_tools.stack import create_topics, delete_topics

PARTITIONS = 4
REQUESTS = 64  # request ids the backlog records are keyed by
WARMUP = 50  # records produced (and, at low rate, fetched) before any clock starts
FETCH_TIMEOUT_S = 0.2  # the gateway's getmany(timeout_ms=200)
FETCH_MAX_WAIT_MS = 100  # the gateway's owned-partitions reader (gateway/resources.py)
# Records handed to the loop at once, both clients (the aggregator's batch default; the gateway
# takes whatever aiokafka has, which at backlog would make aiokafka's batches far larger).
MAX_BATCH = 1000
LATENCY_KIND = "1-token + trace"  # the commonest record: one token, tracing always on

# Realistic field values: ids as the services make them (gateway/admission.py, llmstream_tools/
# admin.py), the worker id a Kubernetes pod gets (deploy/k8s/base/worker.yaml: the pod name),
# English-like tokens of a 49k vocabulary (SmolLM2's).
TENANT_ID = "t_3f9a1c07d2b84e65"
PRODUCER_ID = "llmstream-worker-7c9d5b8f6-q4x2z"
TOKENS = [" The", " model", " streams", " each", " token", " to", " the", " browser"]
TOKEN_IDS = [378, 1743, 22301, 2362, 9352, 288, 260, 7493]
SEQ = 37  # mid-stream
# The size audit's event time: fixed, so the audit does not vary by a byte from run to run (the
# varint of the nanoseconds is 4 or 5 bytes; 5 for 73 % of instants).
AUDIT_TIME_NS = 1_796_680_800_123_456_789
TRACESTATE = ""  # what our services write (no vendor state)


def request_id(i: int) -> str:
    return "req_" + uuid.UUID(int=0x5EED0000 + i).hex


def traceparent(rid: str) -> str:
    """W3C traceparent: version, 16-byte trace id, 8-byte parent span id, flags (sampled)."""
    trace_id = uuid.uuid5(uuid.NAMESPACE_URL, rid).hex
    return f"00-{trace_id}-{trace_id[:16]}-01"


def token_event(rid: str, tokens: int, trace: bool, at_ns: int | None = None) -> events_pb2.Event:
    """A token event as the worker writes it (same fields as worker.core.DeltaEncoder's)."""
    event = codec.new_event(rid, TENANT_ID, PRODUCER_ID)
    if at_ns is not None:
        event.event_time.FromNanoseconds(at_ns)
    if trace:
        event.trace.traceparent = traceparent(rid)
        event.trace.tracestate = TRACESTATE
    event.token_delta.seq = SEQ
    event.token_delta.text = "".join(TOKENS[:tokens])
    event.token_delta.token_ids.extend(TOKEN_IDS[:tokens])
    return event


class Record(NamedTuple):
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    partition: int


KINDS: dict[str, tuple[int, bool]] = {
    "1-token": (1, False),
    "1-token + trace": (1, True),
    "8-token": (8, False),
    "8-token + trace": (8, True),
}


def records(kind: str) -> list[Record]:
    tokens, trace = KINDS[kind]
    out = []
    for i in range(REQUESTS):
        ev = token_event(request_id(i), tokens, trace)
        out.append(Record(codec.key(ev), codec.encode(ev), codec.headers(ev), i % PARTITIONS))
    return out


# -- record size (Kafka record format v2: KIP-98) ----------------------------------------------

BATCH_HEADER = 61  # bytes of a record batch's header, paid once per batch (per record at low rate)


def _varint(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _zigzag(n: int) -> int:
    return _varint((n << 1) ^ (n >> 63))


def record_size(key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    """Bytes of one record inside a batch (first record: timestamp and offset deltas 0)."""
    body = 1 + _zigzag(0) + _zigzag(0)  # attributes, timestampDelta, offsetDelta
    body += _zigzag(len(key)) + len(key) + _zigzag(len(value)) + len(value)
    body += _zigzag(len(headers))
    for k, v in headers:
        body += _zigzag(len(k.encode())) + len(k.encode()) + _zigzag(len(v)) + len(v)
    return _zigzag(body) + body


@dataclass(frozen=True)
class Cut:
    name: str
    why: str


# Cumulative: each step keeps the previous ones. None changes the schema (every field stays, a
# token event just leaves some empty); the reader side would take them from the key, the record
# timestamp and the request's `started` event.
CUTS = [
    Cut("today", "content-type + event-type + traceparent headers; full envelope on every event"),
    Cut(
        "A: no content-type header on token events",
        "one schema per topic (docs/events.md); every reader decodes the value anyway",
    ),
    Cut(
        "B: + trace context only on started/terminal events",
        "spans are per request, never per token (llmstream/tracing.py): drops the traceparent "
        "header and the envelope's copy of it",
    ),
    Cut(
        "C: + no request_id, event_time, producer_id in token events",
        "request_id is the record key, the record timestamp (CreateTime, the producer's clock) "
        "is event_time, started names the worker",
    ),
    Cut(
        "D: + no tenant_id in token events",
        "submitted and started carry it; the fold keys state by request",
    ),
    Cut(
        "E: + request id 22 characters (base64url of the same 128 bits) instead of 36",
        "'req_' + 32 hex spends 14 bytes of every key on the encoding",
    ),
]


def cut_record(step: int, tokens: int, trace: bool) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a token event after cuts 1..step of CUTS."""
    rid = request_id(0)
    ev = token_event(rid, tokens, trace, AUDIT_TIME_NS)
    headers = codec.headers(ev)
    if step >= 1:
        headers = [h for h in headers if h[0] != "content-type"]
    if step >= 2:
        headers = [h for h in headers if h[0] not in ("traceparent", "tracestate")]
        ev.ClearField("trace")
    if step >= 3:
        for field in ("request_id", "event_time", "producer_id"):
            ev.ClearField(field)
    if step >= 4:
        ev.ClearField("tenant_id")
    key = rid.encode()
    if step >= 5:
        key = key[:22]  # the length of base64url(16 bytes) without padding
    return key, ev.SerializeToString(), headers


EnvelopeField = Literal[
    "schema_version", "request_id", "tenant_id", "event_time", "trace", "producer_id"
]
ENVELOPE: tuple[EnvelopeField, ...] = get_args(EnvelopeField)


def size_audit() -> dict[str, Any]:
    """Bytes per token of each kind after each cut; a breakdown of today's commonest record."""
    steps = []
    for i, cut in enumerate(CUTS):
        row: dict[str, Any] = {"cut": cut.name, "why": cut.why, "kinds": {}}
        for kind, (tokens, trace) in KINDS.items():
            key, value, headers = cut_record(i, tokens, trace)
            rec = record_size(key, value, headers)
            row["kinds"][kind] = {
                "key": len(key),
                "value": len(value),
                "headers": sum(len(k) + len(v) for k, v in headers),
                "record": rec,
                "bytes_per_token": round(rec / tokens, 1),
                # At low rate every record is its own batch (and its own produce request).
                "bytes_per_token_alone_in_batch": round((rec + BATCH_HEADER) / tokens, 1),
            }
        steps.append(row)
    ev = token_event(request_id(0), 1, True, AUDIT_TIME_NS)
    parts = {}
    for name in ENVELOPE:  # protobuf sizes add up field by field
        without = events_pb2.Event()
        without.CopyFrom(ev)
        without.ClearField(name)
        parts[f"value: {name}"] = ev.ByteSize() - without.ByteSize()
    body = events_pb2.Event(token_delta=ev.token_delta)
    parts["value: token_delta (seq, text, ids)"] = body.ByteSize()
    parts["key (request id)"] = len(codec.key(ev))
    for k, v in codec.headers(ev):
        parts[f"header {k}"] = len(k) + len(v)
    key, value, headers = codec.key(ev), codec.encode(ev), codec.headers(ev)
    parts["record framing (lengths, attributes, deltas)"] = record_size(key, value, headers) - (
        len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)
    )
    parts["record batch header (once per batch)"] = BATCH_HEADER
    # Packing ids is not a cut to make: proto3 packs repeated scalars already (one tag and one
    # length for the list, then a varint per id: 2-3 bytes in a 49k vocabulary).
    packed = events_pb2.TokenDelta(token_ids=[1, 2]).SerializeToString() == b"\x1a\x02\x01\x02"
    return {"steps": steps, "breakdown_1_token_trace": parts, "token_ids_packed": packed}


# -- clients ------------------------------------------------------------------------------------


class Delivered(NamedTuple):
    partition: int
    offset: int


class BenchProducer(Protocol):
    name: str

    async def start(self) -> None: ...

    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]: ...

    async def stop(self) -> None: ...


class BenchReader(Protocol):
    async def start(self) -> None: ...

    async def assign(self, positions: dict[TopicPartition, int]) -> None: ...

    async def seek(self, positions: dict[TopicPartition, int]) -> None: ...

    async def fetch(self) -> list[Any]: ...

    def touch(self, batch: list[Any]) -> list[int]:
        """Reads what the gateway reads of each record (key, value); returns the offsets."""
        ...

    async def stop(self) -> None: ...


class AiokafkaProducer:
    name = "aiokafka"

    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        conn = kafka.Connection(bootstrap)
        self.producer: AIOKafkaProducer
        if linger_ms == 0:
            self.producer = kafka.event_producer(conn, "bench-kc-aiokafka")  # ours, as is
        else:
            # kafka.event_producer's settings but the linger (it sets 0 on purpose).
            self.producer = AIOKafkaProducer(
                **conn.client_kwargs("bench-kc-aiokafka"),
                enable_idempotence=True,
                acks="all",
                linger_ms=linger_ms,
                max_batch_size=512 * 1024,
            )

    async def start(self) -> None:
        await self.producer.start()

    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = await self.producer.send(
            topic, value=value, key=key, partition=partition, headers=headers
        )
        return fut

    async def stop(self) -> None:
        await self.producer.stop()


class AiokafkaReader:
    def __init__(self, bootstrap: str) -> None:
        self.consumer = kafka.reader(
            kafka.Connection(bootstrap), "bench-kc-aiokafka", fetch_max_wait_ms=FETCH_MAX_WAIT_MS
        )

    async def start(self) -> None:
        await self.consumer.start()

    async def assign(self, positions: dict[TopicPartition, int]) -> None:
        self.consumer.assign(list(positions))
        await self.seek(positions)

    async def seek(self, positions: dict[TopicPartition, int]) -> None:
        for tp, offset in positions.items():
            self.consumer.seek(tp, offset)

    async def fetch(self) -> list[Any]:
        data = await self.consumer.getmany(
            timeout_ms=int(FETCH_TIMEOUT_S * 1000), max_records=MAX_BATCH
        )
        return [rec for recs in data.values() for rec in recs]

    def touch(self, batch: list[Any]) -> list[int]:
        offsets = []
        for rec in batch:
            if rec.key is None or rec.value is None:
                raise AssertionError("a token event has a key and a value")
            offsets.append(rec.offset)
        return offsets

    async def stop(self) -> None:
        await self.consumer.stop()


def _confluent() -> Any:
    try:
        import confluent_kafka
    except ModuleNotFoundError:
        sys.exit("llmstream bench kafka-clients needs confluent-kafka: pip install -e '.[dev]'")
    return confluent_kafka


class ConfluentProducer:
    """librdkafka for an asyncio service: `produce()` only enqueues, so it runs on the loop; a
    thread blocks in `poll()` (which runs the delivery callbacks) and hands each poll's reports
    to the loop at once, so a burst of acknowledgements costs one loop wake-up, not one each."""

    name = "confluent-kafka"

    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        self.conf = {
            "bootstrap.servers": bootstrap,
            "client.id": "bench-kc-confluent",
            "enable.idempotence": True,
            "acks": "all",
            # librdkafka's default is 5 ms too (KIP-1030 did the same for the Java client).
            "linger.ms": linger_ms,
            "batch.size": 512 * 1024,
            # asyncio sets TCP_NODELAY on its sockets (aiokafka's too); librdkafka does not.
            "socket.nagle.disable": True,
        }
        self._reports: list[tuple[asyncio.Future[Any], Any, Any]] = []
        self._stopping = threading.Event()

    async def start(self) -> None:
        ck = _confluent()
        self.loop = asyncio.get_running_loop()
        self.producer = ck.Producer(self.conf)
        self.thread = threading.Thread(target=self._poll, name="kc-delivery", daemon=True)
        self.thread.start()

    def _delivered(self, fut: asyncio.Future[Any], err: Any, msg: Any) -> None:
        self._reports.append((fut, err, msg))  # on the poll thread

    def _hand_over(self) -> None:
        if self._reports:
            reports, self._reports = self._reports, []
            self.loop.call_soon_threadsafe(self._settle, reports)

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self.producer.poll(0.1)
            self._hand_over()
        self.producer.flush(30)
        self._hand_over()

    @staticmethod
    def _settle(reports: list[tuple[asyncio.Future[Any], Any, Any]]) -> None:
        for fut, err, msg in reports:
            if fut.done():
                continue
            if err is not None:
                fut.set_exception(RuntimeError(str(err)))
            else:
                fut.set_result(Delivered(msg.partition(), msg.offset()))

    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        callback = functools.partial(self._delivered, fut)
        while True:
            try:
                self.producer.produce(
                    topic, value, key, partition=partition, headers=headers, on_delivery=callback
                )
                return fut
            except BufferError:
                # librdkafka's queue is full: wait for acknowledgements, as aiokafka's `send`
                # waits for room in its batch.
                await asyncio.sleep(0.005)

    async def floor(self, topic: str, recs: Sequence[Record], n: int) -> dict[str, float]:
        """The least librdkafka costs from Python: `produce()` alone, no callback and no
        future per record; the clock stops when `flush()` says every record was acknowledged.
        What an integration that acknowledges per request or batch could approach."""
        clock = Clock()
        for i in range(n):
            r = recs[i % len(recs)]
            while True:
                try:
                    self.producer.produce(
                        topic, r.value, r.key, partition=r.partition, headers=r.headers
                    )
                    break
                except BufferError:
                    await asyncio.sleep(0.005)
        await asyncio.to_thread(self.producer.flush, 30)
        return clock.per_record("produce_floor", n)

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self.thread.join)


class ConfluentReader:
    """librdkafka for an asyncio service: a thread blocks in `poll()` for the first record, takes
    what else is already fetched with `consume(n, 0)` (consume(n, t) with t > 0 would wait for n
    records or t) and hands the batch to the loop; at most a few batches wait there
    (backpressure). Assignments and seeks run on that thread between polls (the consumer serves
    one caller at a time)."""

    def __init__(self, bootstrap: str) -> None:
        self.conf = {
            "bootstrap.servers": bootstrap,
            "client.id": "bench-kc-confluent",
            # Required by librdkafka even without subscribe(); never joined, never committed.
            "group.id": f"llmstream-bench-kc-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
            "socket.nagle.disable": True,
        }
        self._commands: queue.SimpleQueue[tuple[Callable[[Any], None], asyncio.Future[None]]] = (
            queue.SimpleQueue()
        )
        self._room = threading.Semaphore(4)
        self._stopping = threading.Event()
        self._batches: asyncio.Queue[list[Any]] = asyncio.Queue()

    async def start(self) -> None:
        ck = _confluent()
        self.ck = ck
        self.loop = asyncio.get_running_loop()
        self.consumer = ck.Consumer(self.conf)
        self.thread = threading.Thread(target=self._fetch, name="kc-fetch", daemon=True)
        self.thread.start()

    def _serve_commands(self) -> None:
        while True:
            try:
                command, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command(self.consumer)
            except Exception as exc:
                self.loop.call_soon_threadsafe(fut.set_exception, exc)
            else:
                self.loop.call_soon_threadsafe(fut.set_result, None)

    def _fetch(self) -> None:
        c = self.consumer
        while not self._stopping.is_set():
            self._serve_commands()
            first = c.poll(0.1)
            if first is None:
                continue
            batch = [m for m in [first, *c.consume(MAX_BATCH - 1, 0)] if m.error() is None]
            if not batch:
                continue
            while not self._room.acquire(timeout=0.1):
                if self._stopping.is_set():
                    break
            self.loop.call_soon_threadsafe(self._batches.put_nowait, batch)
        c.close()

    async def _call(self, command: Callable[[Any], None]) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        self._commands.put((command, fut))
        await fut

    async def assign(self, positions: dict[TopicPartition, int]) -> None:
        tps = [self.ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in positions.items()]
        await self._call(lambda c: c.assign(tps))

    async def seek(self, positions: dict[TopicPartition, int]) -> None:
        """Batches fetched before the seek are dropped (before: so the thread is not stuck
        waiting for room and can run the seek; after: those it handed over meanwhile)."""
        tps = [self.ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in positions.items()]

        def seek(c: Any) -> None:
            for tp in tps:
                c.seek(tp)

        self._drop_batches()
        await self._call(seek)
        self._drop_batches()

    def _drop_batches(self) -> None:
        while not self._batches.empty():
            self._batches.get_nowait()
            self._room.release()

    async def fetch(self) -> list[Any]:
        try:
            batch = await asyncio.wait_for(self._batches.get(), FETCH_TIMEOUT_S)
        except TimeoutError:
            return []
        self._room.release()
        return batch

    def touch(self, batch: list[Any]) -> list[int]:
        offsets = []
        for msg in batch:
            if msg.key() is None or msg.value() is None:
                raise AssertionError("a token event has a key and a value")
            offsets.append(msg.offset())
        return offsets

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self.thread.join)


CLIENTS = ("aiokafka", "confluent-kafka")


def new_producer(client: str, bootstrap: str, linger_ms: int) -> BenchProducer:
    if client == "aiokafka":
        return AiokafkaProducer(bootstrap, linger_ms)
    return ConfluentProducer(bootstrap, linger_ms)


def new_reader(client: str, bootstrap: str) -> BenchReader:
    if client == "aiokafka":
        return AiokafkaReader(bootstrap)
    return ConfluentReader(bootstrap)


# -- measurements -------------------------------------------------------------------------------


def _slug(kind: str) -> str:
    return kind.replace(" + ", "-").replace(" ", "")


class Clock:
    """CPU of the whole process (every thread, librdkafka's included), CPU of the event loop's
    thread alone (the one a Python service runs out of first), wall time."""

    def __init__(self) -> None:
        self.cpu, self.loop, self.wall = (
            time.process_time(),
            time.thread_time(),
            time.perf_counter(),
        )

    def per_record(self, prefix: str, n: int) -> dict[str, float]:
        cpu = time.process_time() - self.cpu
        loop = time.thread_time() - self.loop
        wall = time.perf_counter() - self.wall
        return {
            f"{prefix}_cpu_us_per_record": round(cpu / n * 1e6, 2),
            f"{prefix}_loop_cpu_us_per_record": round(loop / n * 1e6, 2),
            f"{prefix}_records_per_s": round(n / wall),
        }


Ranges = dict[str, tuple[dict[TopicPartition, int], dict[TopicPartition, int]]]


async def produce_backlog(
    client: str, bootstrap: str, topics: dict[str, str], n: int, linger_ms: int
) -> tuple[dict[str, dict[str, float]], Ranges]:
    """Per kind: n records sent without waiting in between (many streams' emitters at once);
    the clock stops when every one is acknowledged. Also the offsets they got."""
    out: dict[str, dict[str, float]] = {}
    ranges: Ranges = {}
    producer = new_producer(client, bootstrap, linger_ms)
    await producer.start()
    try:
        for kind, topic in topics.items():
            recs = records(kind)
            warm = [
                await producer.send(topic, r.value, r.key, r.partition, r.headers) for r in recs
            ]
            await asyncio.gather(*warm)  # connection, metadata, producer id: off the clock
            clock = Clock()
            futs = []
            for i in range(n):
                r = recs[i % REQUESTS]
                futs.append(await producer.send(topic, r.value, r.key, r.partition, r.headers))
            done = await asyncio.gather(*futs)
            out[kind] = clock.per_record(f"produce_linger{linger_ms}", n)
            start: dict[TopicPartition, int] = {}
            end: dict[TopicPartition, int] = {}
            for d in done:
                tp = TopicPartition(topic, d.partition)
                start[tp] = min(start.get(tp, d.offset), d.offset)
                end[tp] = max(end.get(tp, d.offset + 1), d.offset + 1)
            ranges[kind] = (start, end)
    finally:
        await producer.stop()
    return out, ranges


async def produce_floor(bootstrap: str, topics: dict[str, str], n: int) -> dict[str, Any]:
    """Per kind: librdkafka's floor from Python (ConfluentProducer.floor), linger 0."""
    out: dict[str, dict[str, float]] = {}
    producer = ConfluentProducer(bootstrap, linger_ms=0)
    await producer.start()
    try:
        for kind, topic in topics.items():
            recs = records(kind)
            warm = [
                await producer.send(topic, r.value, r.key, r.partition, r.headers) for r in recs
            ]
            await asyncio.gather(*warm)
            out[kind] = await producer.floor(topic, recs, n)
    finally:
        await producer.stop()
    return out


async def read(reader: BenchReader, count: int, within_s: float = 30) -> int:
    """Fetch until at least `count` records came; how many did."""
    deadline = time.monotonic() + within_s
    got = 0
    while got < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{got} of {count} records fetched in {within_s} s")
        got += len(reader.touch(await reader.fetch()))
    return got


async def fetch_backlog(
    client: str, bootstrap: str, ranges: Ranges, n: int
) -> dict[str, dict[str, float]]:
    """Per kind: the n records of `ranges` read back by a reader assigned to their partitions."""
    out: dict[str, dict[str, float]] = {}
    reader = new_reader(client, bootstrap)
    await reader.start()
    try:
        for kind, (start, end) in ranges.items():
            # Off the clock: every partition fetched once (its last record, the topic's last:
            # nothing to prefetch), so the clock sees fetching, not metadata and connections;
            # then back to the start. librdkafka sends the seek's fetch only when the long poll
            # in flight ends (<= fetch max wait), aiokafka at once: records/s counts from the
            # first batch on (the delivery rate once records flow), the CPU from the seek.
            await reader.assign({tp: offset - 1 for tp, offset in end.items()})
            await read(reader, len(end))
            clock = Clock()  # before the seek: librdkafka's thread may start fetching first
            await reader.seek(start)
            first = await read(reader, 1)
            began = time.perf_counter()
            await read(reader, n - first)
            wall = time.perf_counter() - began
            out[kind] = clock.per_record("fetch", n)
            # Delivery rate once records flow (0: the first batch held them all).
            out[kind]["fetch_records_per_s"] = round((n - first) / wall) if n > first else 0
    finally:
        await reader.stop()
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def paced(
    client: str, bootstrap: str, topic: str, linger_ms: int, rates: Sequence[int], seconds: float
) -> dict[int, dict[str, float]]:
    """One stream at each rate: produce -> fetch latency and CPU per record (both sides)."""
    rec = records(LATENCY_KIND)[0]
    tp = TopicPartition(topic, 0)
    producer = new_producer(client, bootstrap, linger_ms)
    reader = new_reader(client, bootstrap)
    await producer.start()
    await reader.start()
    received: dict[int, float] = {}
    first = (await (await producer.send(topic, rec.value, rec.key, 0, rec.headers))).offset
    await reader.assign({tp: first})

    async def receive() -> None:
        while True:
            batch = await reader.fetch()
            now = time.perf_counter()
            for offset in reader.touch(batch):
                received[offset] = now

    async def until_received(last: int, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while last not in received:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{client}: offset {last} not fetched within {within_s} s")
            await asyncio.sleep(0.01)

    receiver = asyncio.create_task(receive())
    out: dict[int, dict[str, float]] = {}
    try:
        for _ in range(WARMUP):
            await producer.send(topic, rec.value, rec.key, 0, rec.headers)
        await until_received(first + WARMUP, 30)
        for rate in rates:
            count = max(1, round(rate * seconds))
            futs = []
            clock = Clock()
            began = time.perf_counter()
            for i in range(count):
                delay = began + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = time.perf_counter()
                fut = await producer.send(topic, rec.value, rec.key, 0, rec.headers)
                futs.append((now, fut))
            done = [(t, await f) for t, f in futs]
            await until_received(done[-1][1].offset, 30)
            cpu = clock.per_record("paced", count)
            lat = [(received[d.offset] - t) * 1000 for t, d in done]
            out[rate] = {
                "records": count,
                "latency_ms_p50": round(_quantile(lat, 0.5), 2),
                "latency_ms_p99": round(_quantile(lat, 0.99), 2),
                "cpu_us_per_record": cpu["paced_cpu_us_per_record"],
                "loop_cpu_us_per_record": cpu["paced_loop_cpu_us_per_record"],
            }
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        await producer.stop()
        await reader.stop()
    return out


# -- the suite ----------------------------------------------------------------------------------


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--kc-records", type=int, default=10_000, help="records per kind, client and repeat"
    )
    group.add_argument(
        "--kc-rates", type=int, nargs="+", default=[200, 2000], help="low-rate runs, records/s"
    )
    group.add_argument("--kc-seconds", type=float, default=1.5, help="length of a low-rate run")
    group.add_argument("--kc-repeat", type=int, default=3, help="alternations of the two clients")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _ratios(runs: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """confluent-kafka / aiokafka of one metric: the median of the per-repeat ratios."""
    ratios = [
        r["confluent-kafka"][metric] / r["aiokafka"][metric] for r in runs if r["aiokafka"][metric]
    ] or [0.0]  # a tiny run may have nothing to divide by (records/s 0)
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _row(what: str, runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, str]:
    """One fact: each client's medians of `metrics` (joined by ' / '), then the ratios
    confluent-kafka / aiokafka, with the spread of the first one over the repeats."""
    values = {
        c: " / ".join(_fmt(_median([r[c][m] for r in runs])) for m in metrics) for c in CLIENTS
    }
    ratios = [_ratios(runs, m) for m in metrics]
    ratio = " / ".join(f"{r['median']:.2f}" for r in ratios)
    return {
        "what": what,
        "value": f"aiokafka {values['aiokafka']} · confluent-kafka {values['confluent-kafka']} · "
        f"ratio {ratio} [{ratios[0]['min']:.2f}-{ratios[0]['max']:.2f}]",
    }


def _floor(where: str, runs: list[dict[str, Any]]) -> dict[str, str]:
    """confluent-kafka's floor (produce() alone) against aiokafka's produce as we use it."""
    ck = [r["confluent-kafka"] for r in runs]
    ratios = [
        c["produce_floor_cpu_us_per_record"] / r["aiokafka"]["produce_linger0_cpu_us_per_record"]
        for c, r in zip(ck, runs, strict=True)
    ]
    cpu = _median([c["produce_floor_cpu_us_per_record"] for c in ck])
    loop = _median([c["produce_floor_loop_cpu_us_per_record"] for c in ck])
    return {
        "what": f"produce floor (confluent-kafka: produce() alone, no future per record): "
        f"CPU µs/record, process / event loop; {where}",
        "value": f"confluent-kafka {_fmt(cpu)} / {_fmt(loop)} · ratio to aiokafka's produce "
        f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]",
    }


def summarize(result: dict[str, Any]) -> list[dict[str, str]]:
    facts: list[dict[str, str]] = []
    sizes = {row["cut"]: row["kinds"] for row in result["record_size"]["steps"]}
    today = sizes[CUTS[0].name]
    for kind, runs in result["backlog"].items():
        where = f"{kind} ({today[kind]['record']} B), backlog"
        for phase, label in (
            ("produce_linger0", "produce, linger 0"),
            ("fetch", "fetch"),
            ("produce_linger5", "produce, linger 5 ms"),
        ):
            facts.append(
                _row(
                    f"{label}: CPU µs/record, process / event loop; {where}",
                    runs,
                    [f"{phase}_cpu_us_per_record", f"{phase}_loop_cpu_us_per_record"],
                )
            )
            rate = "records/s (first to last record)" if phase == "fetch" else "records/s"
            facts.append(_row(f"{label}: {rate}; {where}", runs, [f"{phase}_records_per_s"]))
            if phase == "produce_linger0":
                facts.append(_floor(where, runs))
    for linger, by_rate in result["low_rate"].items():
        for rate, runs in by_rate.items():
            where = f"{rate}/s, linger {linger} ms, {LATENCY_KIND}"
            facts.append(
                _row(
                    f"produce→fetch ms p50 / p99; {where}",
                    runs,
                    ["latency_ms_p50", "latency_ms_p99"],
                )
            )
            facts.append(
                _row(
                    f"CPU µs/record, producer + reader, idle included, process / event loop; "
                    f"{where}",
                    runs,
                    ["cpu_us_per_record", "loop_cpu_us_per_record"],
                )
            )
    for cut, kinds in sizes.items():
        parts = [
            f"{kind} {v['bytes_per_token']:g} ({v['bytes_per_token_alone_in_batch']:g})"
            for kind, v in kinds.items()
        ]
        facts.append({"what": f"bytes/token, {cut}", "value": " · ".join(parts)})
    parts = [f"{k} {v}" for k, v in result["record_size"]["breakdown_1_token_trace"].items()]
    facts.append({"what": "bytes of today's 1-token + trace record", "value": " · ".join(parts)})
    facts.append(
        {
            "what": "token ids already packed (proto3 default: no cut to make there)",
            "value": "yes" if result["record_size"]["token_ids_packed"] else "NO",
        }
    )
    versions = result["versions"]
    facts.append(
        {
            "what": "clients; load average at start / end of the suite",
            "value": f"aiokafka {versions['aiokafka']}, confluent-kafka "
            f"{versions['confluent-kafka']} (librdkafka {versions['librdkafka']}); "
            f"{result['load_average']['start']} / {result['load_average']['end']}",
        }
    )
    return facts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ck = _confluent()
    bootstrap = config.kafka_bootstrap()
    result: dict[str, Any] = {
        "versions": {
            "aiokafka": aiokafka.__version__,
            "confluent-kafka": importlib.metadata.version("confluent-kafka"),
            "librdkafka": ck.libversion()[0],
        },
        "settings": {
            "records": args.kc_records,
            "rates": args.kc_rates,
            "seconds": args.kc_seconds,
            "repeat": args.kc_repeat,
            "partitions": PARTITIONS,
            "producer": "idempotent, acks=all, linger 0 ms (backlog) / 0 and 5 ms (low rate)",
            "reader": f"fetch max wait {FETCH_MAX_WAIT_MS} ms, fetch timeout {FETCH_TIMEOUT_S} s",
        },
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
        "record_size": size_audit(),
    }
    run_id = uuid.uuid4().hex[:8]
    backlog_topics = {
        c: {kind: f"llmstream-bench-kc-{run_id}-{c}-{_slug(kind)}" for kind in KINDS}
        for c in CLIENTS
    }
    paced_topics = {c: f"llmstream-bench-kc-{run_id}-{c}-paced" for c in CLIENTS}
    every = [t for c in CLIENTS for t in backlog_topics[c].values()]
    await create_topics(
        bootstrap, {**dict.fromkeys(every, PARTITIONS), **dict.fromkeys(paced_topics.values(), 1)}
    )
    backlog_runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    low_rate: dict[int, dict[int, list[dict[str, Any]]]] = {
        linger: {rate: [] for rate in args.kc_rates} for linger in (0, 5)
    }
    try:
        for repeat in range(args.kc_repeat):
            order = CLIENTS if repeat % 2 == 0 else CLIENTS[::-1]
            per_client: dict[str, dict[str, dict[str, float]]] = {}
            for client in order:
                topics, n = backlog_topics[client], args.kc_records
                produced, ranges = await produce_backlog(client, bootstrap, topics, n, 0)
                # Before anything else is produced: the reader's ranges end at the topic's end,
                # so nothing past them is prefetched on the clock.
                fetched = await fetch_backlog(client, bootstrap, ranges, n)
                lingered, _ = await produce_backlog(client, bootstrap, topics, n, 5)
                floor = (
                    await produce_floor(bootstrap, topics, n) if client == "confluent-kafka" else {}
                )
                per_client[client] = {
                    kind: produced[kind] | fetched[kind] | lingered[kind] | floor.get(kind, {})
                    for kind in KINDS
                }
            for kind in KINDS:
                backlog_runs[kind].append({c: per_client[c][kind] for c in CLIENTS})
            for linger in (0, 5):
                paced_runs = {}
                for client in order:
                    paced_runs[client] = await paced(
                        client, bootstrap, paced_topics[client], linger, args.kc_rates,
                        args.kc_seconds,
                    )  # fmt: skip
                for rate in args.kc_rates:
                    low_rate[linger][rate].append({c: paced_runs[c][rate] for c in CLIENTS})
            print(f"kafka-clients: repeat {repeat + 1}/{args.kc_repeat} done", file=sys.stderr)
    finally:
        await delete_topics(bootstrap, [*every, *paced_topics.values()])
    result["backlog"] = backlog_runs
    result["low_rate"] = low_rate
    result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    result["facts"] = summarize(result)
    return result
