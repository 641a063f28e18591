"""Scheduling end to end (docs/scheduling.md): real Kafka, real synthetic model servers and a
worker process. Fair share, priority and aging are read from the order of the `started` events
the worker produced; prefix affinity from the replica each `started` names."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmstream.ports import free_port
from llmstream.v1 import common_pb2, events_pb2
from llmstream_tools.testing.worker import (
    Proc,
    Topics,
    collect,
    create_topics,
    delete_topics,
    produce,
    start_model_server,
    start_worker,
    submit_event,
    wait_model_server,
)
from llmstream_tools.testing.worker_fixtures import worker_procs

pytestmark = pytest.mark.integration
procs = worker_procs


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    """One prompts partition: the log order is one total order, so "log order" is exact."""
    t = await create_topics(kafka_bootstrap, partitions=1)
    yield t
    await delete_topics(t)


TOKENS = 40  # at 10 ms a token: ~0.4 s per request


@pytest.fixture(scope="module")
def paced_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_model_server(tmp_path_factory.mktemp("ms"), port, itl_ms=10, ttft_ms=5)
    yield f"127.0.0.1:{port}"
    proc.kill()


def submit(
    topics: Topics, tenant: str, i: int, *, priority: int = 0, text: str | None = None
) -> events_pb2.Event:
    rid = f"{tenant}-{i}-{uuid.uuid4().hex[:8]}"
    ev = submit_event(rid, text or f"{tenant} request {i}", TOKENS, topics.tokens, 0)
    ev.tenant_id = tenant
    ev.submitted.priority = priority
    return ev


async def start_order(topics: Topics, ids: list[str]) -> list[str]:
    """Request ids in the order the worker started them (its `started` events' times)."""
    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=120)
    for rid in ids:
        state = got.check_contract(rid)
        assert state.finish_reason == "length", (rid, state)
    started = [e for rid in ids for e in got.events[rid] if e.HasField("started")]
    assert sorted(e.request_id for e in started) == sorted(ids)  # one attempt each
    started.sort(key=lambda e: e.event_time.ToNanoseconds())
    return [e.request_id for e in started]


async def run_worker(
    topics: Topics,
    procs: list[Proc],
    tmp_path: Path,
    servers: list[str],
    events: list[events_pb2.Event],
    **env: str,
) -> list[str]:
    """Everything is in the log before the worker starts: one fetch sees it all."""
    for addr in servers:
        await wait_model_server(addr)
    await produce(topics.bootstrap, topics.prompts, events)
    procs.append(start_worker(tmp_path, topics.env(servers, **env), "w-sched"))
    return await start_order(topics, [e.request_id for e in events])


async def test_a_quiet_tenant_starts_before_a_burst_drains(
    topics: Topics, procs: list[Proc], tmp_path: Path, paced_server: str
) -> None:
    burst = [submit(topics, "tenant-a", i) for i in range(30)]
    quiet = submit(topics, "tenant-b", 0)
    order = await run_worker(
        topics, procs, tmp_path, [paced_server], [*burst, quiet], LLMSTREAM_WORKER_MAX_INFLIGHT="2"
    )
    # Log order would start B 31st; fair share starts it at once (B is below its share of the
    # slots: the overdraft) or with the first free slot.
    assert order.index(quiet.request_id) <= 3, order


async def test_log_order_without_the_window(
    topics: Topics, procs: list[Proc], tmp_path: Path, paced_server: str
) -> None:
    burst = [submit(topics, "tenant-a", i) for i in range(12)]
    quiet = submit(topics, "tenant-b", 0)
    order = await run_worker(
        topics,
        procs,
        tmp_path,
        [paced_server],
        [*burst, quiet],
        LLMSTREAM_WORKER_MAX_INFLIGHT="2",
        LLMSTREAM_WORKER_READ_AHEAD="0",
    )
    # READ_AHEAD=0: only what fits the free slots is fetched: log order, B last.
    assert order[-1] == quiet.request_id, order


async def test_interactive_overtakes_queued_batch(
    topics: Topics, procs: list[Proc], tmp_path: Path, paced_server: str
) -> None:
    batch = [submit(topics, "tenant-a", i, priority=-1) for i in range(30)]
    chat = submit(topics, "tenant-a", 99, priority=1)
    order = await run_worker(
        topics, procs, tmp_path, [paced_server], [*batch, chat], LLMSTREAM_WORKER_MAX_INFLIGHT="2"
    )
    assert order.index(chat.request_id) <= 2, order


async def test_aging_starts_batch_under_continuous_interactive_load(
    topics: Topics, procs: list[Proc], tmp_path: Path, paced_server: str
) -> None:
    # One tenant: fair share (and its overdraft for tenants below their share) stays out.
    batch = submit(topics, "tenant-a", 0, priority=-1)
    chats = [submit(topics, "tenant-a", i, priority=1) for i in range(1, 21)]
    order = await run_worker(
        topics,
        procs,
        tmp_path,
        [paced_server],
        [batch, *chats],
        LLMSTREAM_WORKER_MAX_INFLIGHT="1",
        LLMSTREAM_WORKER_AGING_S="0.5",
    )
    # Without aging the batch request would start last (21st). After two aging periods (1 s,
    # ~2-3 interactive requests of 0.4 s) it is in the top class and, the oldest there, next.
    assert 1 <= order.index(batch.request_id) < 10, order


def chat_prompt(system: str, user: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        chat=common_pb2.ChatPrompt(
            messages=[
                common_pb2.ChatMessage(role="system", content=system),
                common_pb2.ChatMessage(role="user", content=user),
            ]
        )
    )


async def test_same_prefix_lands_on_the_same_replica(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    servers = []
    for _ in range(2):
        port = free_port()
        procs.append(start_model_server(tmp_path, port, itl_ms=1, ttft_ms=1))
        servers.append(f"127.0.0.1:{port}")
    for addr in servers:
        await wait_model_server(addr)
    systems = [f"You are assistant number {k}. " * 30 for k in range(3)]
    events = []
    for k, system in enumerate(systems):
        for i in range(6):
            ev = submit(topics, "tenant-a", 10 * k + i)
            ev.submitted.prompt.CopyFrom(chat_prompt(system, f"question {i}"))
            events.append(ev)
    distinct = [submit(topics, "tenant-a", 100 + i, text=f"{i} unrelated") for i in range(20)]
    await produce(topics.bootstrap, topics.prompts, [*events, *distinct])
    # One request at a time: every pick sees equal loads, so only the key decides.
    env = topics.env(servers, LLMSTREAM_WORKER_MAX_INFLIGHT="1")
    procs.append(start_worker(tmp_path, env, "w-route"))
    ids = [e.request_id for e in [*events, *distinct]]
    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=120)
    for k in range(len(systems)):
        group = [e.request_id for e in events[6 * k : 6 * k + 6]]
        replicas = {got.state(r).model_server for r in group}
        assert len(replicas) == 1, (k, replicas)
    # Different prefixes spread over both replicas.
    assert {got.state(e.request_id).model_server for e in distinct} == set(servers)
