"""The two Kafka clients `llmstream bench kafka-clients` compares, behind one small interface:
aiokafka as our services use it, and confluent-kafka (librdkafka) the way an asyncio service
would have to drive it (see kafka_clients.py's docstring)."""

from __future__ import annotations

import asyncio
import functools
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition

from llmstream import kafka
from llmstream_tools.bench.kafka_records import (
    FETCH_MAX_WAIT_MS,
    FETCH_TIMEOUT_S,
    MAX_BATCH,
    Record,
)


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
        conn = kafka.Connection.from_env(bootstrap=bootstrap)
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
            kafka.Connection.from_env(bootstrap=bootstrap),
            "bench-kc-aiokafka",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
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


def librdkafka_connection(bootstrap: str) -> dict[str, Any]:
    """librdkafka's settings for the brokers and this process's credentials, the same ones
    `kafka.Connection.from_env` gives every aiokafka client (SASL when the cluster has it)."""
    conn = kafka.Connection.from_env(bootstrap=bootstrap)
    settings: dict[str, Any] = {"bootstrap.servers": conn.bootstrap}
    auth = conn.auth
    if auth.security_protocol != "PLAINTEXT":
        settings.update(
            {
                "security.protocol": auth.security_protocol,
                "sasl.mechanism": auth.sasl_mechanism,
                "sasl.username": auth.username,
                "sasl.password": auth.password,
            }
        )
    return settings


class ConfluentProducer:
    """librdkafka for an asyncio service: `produce()` only enqueues, so it runs on the loop; a
    thread blocks in `poll()` (which runs the delivery callbacks) and hands each poll's reports
    to the loop at once, so a burst of acknowledgements costs one loop wake-up, not one each."""

    name = "confluent-kafka"

    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        self.conf = {
            **librdkafka_connection(bootstrap),
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
            **librdkafka_connection(bootstrap),
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
        """A new assignment at these offsets, not `Consumer.seek()`: confluent-kafka's seek is
        asynchronous and drops its errors, and a seek that came while a partition's fetch was
        not in the state it accepts seeks in was lost without a word (the partition stayed at
        its old position: "0 of 50 records fetched in 30 s", one run in six at load 8-15).
        An assignment sets the start offsets before fetching starts. Batches fetched before are
        dropped (before: so the thread is not stuck waiting for room and can run the
        assignment; after: those it handed over meanwhile)."""
        tps = [self.ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in positions.items()]

        def reassign(c: Any) -> None:
            c.unassign()
            c.assign(tps)

        self._drop_batches()
        await self._call(reassign)
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
