"""How the worker stops (worker/service.py) against fake Kafka clients: a dead background loop
stops it at once with exit status 1; SIGTERM drains; a second signal cuts the drain short. And
how it stops producing: a commit the group refuses closes the produce gate until a new
assignment; while closed, a commit with the worker's generation reopens it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from llmstream import codec
from llmstream.runner import Shutdown
from worker.run import Run
from worker.service import KafkaClients, Worker
from worker.settings import Settings

TP = TopicPartition("prompts", 0)


class GroupConsumer:
    """Assigns `TP` when it starts; fetches nothing."""

    def __init__(self) -> None:
        # What aiokafka's consumer holds (the fence's generation, the evictable member id).
        self._coordinator = SimpleNamespace(generation=4, member_id="w-member-1")
        self.listener: Any = None
        self.assigned: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_error: Exception | None = None
        self.committed_error: Exception | None = None
        self.stopped = False

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        self.assigned = {TP}
        await self.listener.on_partitions_assigned({TP})

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, **_: Any) -> dict[Any, Any]:
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.commit_error is not None:
            raise self.commit_error
        self.commits.append(dict(offsets))

    async def end_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def committed(self, tp: TopicPartition) -> int | None:
        if self.committed_error is not None:
            raise self.committed_error
        return None


class Reader:
    """A group-less reader (cancel lookahead, takeover); `fail` makes its next fetch raise."""

    def __init__(self) -> None:
        self.fail = asyncio.Event()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: list[TopicPartition]) -> None:
        pass

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        pass

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, **_: Any) -> dict[Any, Any]:
        await asyncio.sleep(timeout_ms / 1000)
        if self.fail.is_set():
            raise RuntimeError("lookahead broke")
        return {}

    def highwater(self, tp: TopicPartition) -> int:
        return 0

    async def position(self, tp: TopicPartition) -> int:
        return 0


class Producer:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def send(self, topic: str, **record: Any) -> asyncio.Future[None]:
        self.sent.append((topic, record))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class Fakes:
    def __init__(self) -> None:
        self.consumer = GroupConsumer()
        self.producer = Producer()
        self.lookahead = Reader()
        self.clients = KafkaClients(self.consumer, self.producer, Reader(), self.lookahead)


def worker(fakes: Fakes, shutdown: Shutdown | None = None, drain_timeout_s: float = 5.0) -> Worker:
    settings = Settings(
        bootstrap="",
        prompts_topic=TP.topic,
        tokens_topic="tokens",
        dlq_topic="dlq",
        group="g",
        worker_id="w",
        model_servers=["127.0.0.1:1"],
        drain_timeout_s=drain_timeout_s,
    )
    return Worker(settings, shutdown, clients=fakes.clients)


async def started(w: Worker) -> asyncio.Task[int]:
    task = asyncio.create_task(w.run())
    for _ in range(200):
        if w.partitions.get(TP) is not None:
            return task
        await asyncio.sleep(0.01)
    raise AssertionError("the worker did not take its partition")


def in_flight(w: Worker, offset: int, work: float) -> Run:
    """A request running for `work` seconds (its executor is not under test here)."""
    state = w.partitions.get(TP)
    assert state is not None
    state.fetched(offset)
    run = Run(TP, offset, 0, codec.new_event(f"r{offset}", "t"), needs_lookup=False)
    w.partitions.admit(run)

    async def serve() -> None:
        await asyncio.sleep(work)
        w.partitions.finish(run)

    run.task = asyncio.create_task(serve())
    return run


async def test_a_dead_loop_stops_the_worker_at_once_with_status_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fakes = Fakes()
    w = worker(fakes)
    task = await started(w)
    run = in_flight(w, 0, work=3600)
    fakes.lookahead.fail.set()
    assert await asyncio.wait_for(task, 5) == 1
    assert not w.supervisor.healthy
    assert w.supervisor.failures == ["cancel-lookahead: RuntimeError: lookahead broke"]
    assert "loop cancel-lookahead died" in caplog.text
    assert "a background loop died; stopping without a drain" in caplog.text
    # No drain: the request is left for the next owner, uncommitted; the group is left.
    assert run.abandoned and run.task is not None and run.task.cancelled()
    assert w.partitions.inflight == 0 and fakes.producer.sent == []
    assert fakes.consumer.commits == [] and fakes.consumer.stopped


async def test_a_dead_committer_stops_the_worker_too() -> None:
    fakes = Fakes()
    w = worker(fakes)
    task = await started(w)
    fakes.consumer.commit_error = ValueError("not a Kafka error")
    state = w.partitions.get(TP)
    assert state is not None
    state.fetched(0)
    state.done(0)  # something to commit
    assert await asyncio.wait_for(task, 5) == 1
    assert w.supervisor.failures[0].startswith("committer: ValueError")
    assert fakes.consumer.stopped  # the last commit failed too; the group is left anyway


async def test_sigterm_drains_in_flight_requests_then_exits_0() -> None:
    fakes = Fakes()
    shutdown = Shutdown()
    w = worker(fakes, shutdown)
    task = await started(w)
    run = in_flight(w, 0, work=0.3)
    shutdown.signal()
    assert await asyncio.wait_for(task, 5) == 0
    assert not run.abandoned and w.supervisor.healthy
    assert fakes.consumer.commits[-1] == {TP: 1}  # the finished request is committed


async def test_a_second_signal_cuts_the_drain_short() -> None:
    fakes = Fakes()
    shutdown = Shutdown()
    w = worker(fakes, shutdown, drain_timeout_s=60)
    task = await started(w)
    run = in_flight(w, 0, work=3600)
    shutdown.signal()
    await asyncio.sleep(0.3)
    assert not task.done()  # draining
    shutdown.signal()
    assert await asyncio.wait_for(task, 5) == 0
    assert run.abandoned and fakes.consumer.commits == []


async def test_a_failed_rebalance_callback_stops_the_worker_with_status_1() -> None:
    fakes = Fakes()
    fakes.consumer.committed_error = RuntimeError("no coordinator")
    w = worker(fakes)
    assert await asyncio.wait_for(w.run(), 5) == 1
    assert isinstance(w.fatal, RuntimeError) and w.partitions.get(TP) is None


async def test_a_refused_commit_stops_producing_until_the_group_confirms_the_worker() -> None:
    fakes = Fakes()
    w = worker(fakes)
    task = await started(w)
    state = w.partitions.get(TP)
    assert state is not None and state.generation == 4
    fakes.consumer.commit_error = CommitFailedError("the group rebalanced")
    state.fetched(0)
    state.done(0)
    await _until(lambda: not w.gate.lease.held)
    assert not w.gate.is_open() and fakes.consumer.commits == []
    # Still a member after all: the next commit goes through and reopens the gate.
    fakes.consumer.commit_error = None
    await _until(lambda: w.gate.lease.held)
    assert fakes.consumer.commits == [{TP: 1}] and w.gate.is_open()
    w.request_stop()
    assert await asyncio.wait_for(task, 5) == 0


async def test_a_closed_gate_is_confirmed_by_committing_what_is_committed_already() -> None:
    fakes = Fakes()
    w = worker(fakes)
    task = await started(w)
    w.gate.lose()  # e.g. the process stood still: nothing new to commit, the commit point is 0
    await _until(lambda: w.gate.lease.held)
    assert fakes.consumer.commits == [{TP: 0}]
    w.request_stop()
    assert await asyncio.wait_for(task, 5) == 0


async def _until(cond: Any) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")
