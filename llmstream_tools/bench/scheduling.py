"""What the scheduling benchmarks share (`noisy_neighbour`, `priority`): a worker over fresh
topics in front of a paced synthetic model server, one long-lived producer for the submits and
a tracker that follows the tokens topic and times every request's first token and end.

Times are the bench process's monotonic clock: a request's TTFT is from just before its submit
is handed to the producer to the arrival of its first `token_delta` at the tracker, the same
path in every case compared (Kafka both ways, the worker's scheduling, the model's TTFT).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from llmstream import codec, config, kafka
from llmstream.fold import finish_reason_name, is_terminal
from llmstream.ports import free_port
from llmstream_tools.testing.worker import (
    Proc,
    Topics,
    create_topics,
    delete_topics,
    start_model_server,
    start_worker,
    submit_event,
    wait_model_server,
)


@dataclass
class Timing:
    submitted: float
    first_token: float | None = None
    ended: float | None = None
    finish: str = ""

    @property
    def ttft_s(self) -> float:
        assert self.first_token is not None
        return self.first_token - self.submitted


@dataclass
class Tracker:
    """Follows the tokens topic; `times` by request id."""

    consumer: AIOKafkaConsumer
    times: dict[str, Timing] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batch.values():
                for rec in records:
                    ev = codec.decode_record(rec)
                    timing = self.times.get(ev.request_id)
                    if timing is None:
                        continue
                    if ev.HasField("token_delta") and timing.first_token is None:
                        timing.first_token = now
                    elif is_terminal(ev) and timing.ended is None:
                        timing.ended = now
                        timing.finish = (
                            finish_reason_name(ev.completed.finish_reason)
                            if ev.HasField("completed")
                            else f"failed {ev.failed.code}"
                        )
                    self.changed.set()

    async def wait(self, ids: Sequence[str], *, ended: bool, within_s: float) -> None:
        """Until every request has its first token (or its end); a hang guard, not a goal."""
        deadline = time.monotonic() + within_s
        while True:
            times = [self.times[r] for r in ids]
            if all((t.ended if ended else t.first_token) is not None for t in times):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sum(1 for t in times if (t.ended if ended else t.first_token) is None)
                raise TimeoutError(f"{missing} of {len(ids)} requests not there in {within_s} s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))


@dataclass
class Case:
    """A worker over fresh topics, a producer and a tracker; `submit` times each request."""

    topics: Topics
    producer: AIOKafkaProducer
    tracker: Tracker
    worker: Proc

    async def submit(
        self, tenant: str, n: int, max_tokens: int, priority: int = 0, share: int = 0
    ) -> list[str]:
        events = []
        for i in range(n):
            rid = f"{tenant}-{uuid.uuid4().hex[:12]}"
            ev = submit_event(rid, f"{tenant} prompt {i}", max_tokens, self.topics.tokens, i % 3)
            ev.tenant_id = tenant
            ev.submitted.priority = priority
            ev.submitted.share = share
            events.append(ev)
        now = time.monotonic()
        futures = []
        for ev in events:
            self.tracker.times[ev.request_id] = Timing(now)
            futures.append(
                await self.producer.send(
                    self.topics.prompts,
                    codec.encode(ev),
                    key=codec.key(ev),
                    headers=codec.headers(ev),
                )
            )
        for fut in futures:
            await fut
        return [ev.request_id for ev in events]


@contextlib.asynccontextmanager
async def model_server(ttft_ms: float, itl_ms: float) -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="llmstream-sched-") as tmp:
        port = free_port()
        proc = start_model_server(Path(tmp), port, itl_ms=itl_ms, ttft_ms=ttft_ms)
        try:
            addr = f"127.0.0.1:{port}"
            await wait_model_server(addr)
            yield addr
        finally:
            proc.kill()


@contextlib.asynccontextmanager
async def case(servers: Sequence[str], **env: str) -> AsyncIterator[Case]:
    """A fresh worker (settings `env`) over fresh topics, warmed up by one request."""
    topics = await create_topics(config.kafka_bootstrap())
    conn = kafka.Connection.from_env(bootstrap=topics.bootstrap)
    producer = AIOKafkaProducer(
        **conn.client_kwargs("bench-sched"), enable_idempotence=True, acks="all", linger_ms=0
    )
    consumer = AIOKafkaConsumer(
        topics.tokens,
        **conn.client_kwargs("bench-sched-reader"),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    with tempfile.TemporaryDirectory(prefix="llmstream-sched-") as tmp:
        worker = start_worker(
            Path(tmp),
            topics.env(servers, LLMSTREAM_LOG_LEVEL="WARNING", **env),
            f"sched-{uuid.uuid4().hex[:6]}",
        )
        await producer.start()
        await consumer.start()
        tracker = Tracker(consumer)
        follower = asyncio.create_task(tracker.follow())
        try:
            c = Case(topics, producer, tracker, worker)
            warm = await c.submit("warm-up", 1, 1)
            await tracker.wait(warm, ended=True, within_s=60)
            yield c
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            worker.kill()
            await consumer.stop()
            await producer.stop()
            await delete_topics(topics)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
