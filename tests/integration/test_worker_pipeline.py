"""Worker end to end: real Kafka, real model server and worker processes (synthetic engine)."""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmstream import kafka
from llmstream.ports import free_port
from llmstream_tools.testing.worker import (
    Proc,
    Topics,
    cancel_event,
    collect,
    produce,
    prompt_text,
    read_all,
    reference_text,
    start_worker,
    submit_event,
    wait_assigned,
    wait_progress,
)
from llmstream_tools.testing.worker_fixtures import (
    synthetic_model_server,
    worker_procs,
    worker_topics,
)

pytestmark = pytest.mark.integration
# Fixtures of llmstream_tools.testing.worker_fixtures, under the names the tests use.
topics = worker_topics
procs = worker_procs


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with synthetic_model_server(tmp_path_factory.mktemp("ms"), itl_ms=5, ttft_ms=5) as addr:
        yield addr


def rid() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


async def test_many_requests_across_workers(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path
) -> None:
    """200 requests over 3 workers, the third joining while they run (its rebalance moves
    partitions mid-generation): every request gets seq 1..n, one terminal, the uninterrupted
    text and token ids."""
    env = topics.env([model_server])
    procs += [start_worker(tmp_path, env, f"w{i}") for i in range(2)]
    await wait_assigned(procs, topics.partitions)
    n, max_tokens = 200, 200
    ids = [rid() for _ in range(n)]
    subs = [
        submit_event(r, prompt_text(i), max_tokens, topics.tokens, i % topics.partitions)
        for i, r in enumerate(ids)
    ]
    await produce(topics.bootstrap, topics.prompts, subs)
    procs.append(start_worker(tmp_path, env, "w2"))
    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=40)
    refs = await asyncio.gather(
        *(reference_text(model_server, prompt_text(i), max_tokens) for i in range(n))
    )
    workers = set()
    for i, r in enumerate(ids):
        st = got.check_contract(r)
        assert st.status == "completed", (r, st.finish_reason, st.error_code)
        assert st.finish_reason == "length"
        assert st.completion_tokens == max_tokens
        assert (st.text, st.token_ids) == refs[i]
        assert got.partitions[r] == {i % topics.partitions}
        assert got.events[r][0].HasField("started")
        # `started` and terminal events continue the prompt's trace; compact token deltas
        # carry none (docs/events.md). Each run of the request on a worker (a rebalance
        # starts it again) has its own span, so the parent changes only where a `started`
        # event opens a new run.
        trace_id = subs[i].trace.traceparent.split("-")[1]
        traced = [e for e in got.events[r] if not e.HasField("token_delta")]
        assert not any(e.trace.traceparent for e in got.events[r] if e.HasField("token_delta"))
        assert {e.trace.traceparent.split("-")[1] for e in traced} == {trace_id}
        for before, after in itertools.pairwise(traced):
            if after.trace.traceparent != before.trace.traceparent:
                assert after.HasField("started"), (before, after)
        workers |= {e.started.worker_id for e in got.events[r] if e.HasField("started")}
    assert len(workers) >= 2 and workers <= {"w0", "w1", "w2"}
    assert await committed_equals_end(topics)


async def committed_equals_end(topics: Topics, within_s: float = 10.0) -> bool:
    """True once the worker group's committed offsets reach the end of every prompt partition."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **kafka.Connection(topics.bootstrap).client_kwargs("test"),
        group_id=topics.group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topics.prompts, p) for p in range(topics.partitions)]
        ends = await consumer.end_offsets(tps)
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            committed = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
            if all(committed[tp] == ends[tp] for tp in tps):
                return True
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.3)
    finally:
        await consumer.stop()


async def test_offsets_committed_after_terminal(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path
) -> None:
    port = free_port()
    env = topics.env([model_server], LLMSTREAM_WORKER_METRICS_PORT=str(port))
    procs.append(start_worker(tmp_path, env, "w0"))
    ids = [rid() for _ in range(12)]
    await produce(
        topics.bootstrap,
        topics.prompts,
        [submit_event(r, prompt_text(i), 10, topics.tokens, 0) for i, r in enumerate(ids)],
    )
    got = await collect(topics.bootstrap, topics.tokens, ids)
    for r in ids:
        got.check_contract(r)
    assert await committed_equals_end(topics)
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    )
    samples = {}
    for line in text.decode().splitlines():
        if line.startswith("llmstream_worker_"):
            name, _, value = line.rpartition(" ")
            samples[name.split("{")[0] + ("{length}" if 'outcome="length"' in name else "")] = value
    assert samples["llmstream_worker_requests_total{length}"] == "12.0"
    assert samples["llmstream_worker_tokens_total"] == "120.0"
    assert samples["llmstream_worker_inflight"] == "0.0"


async def test_cancel_before_during_after(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path
) -> None:
    before, during, after = rid(), rid(), rid()
    # Before start: submit and cancel are both in the log before any worker runs.
    await produce(
        topics.bootstrap,
        topics.prompts,
        [submit_event(before, "never run me", 50, topics.tokens, 0), cancel_event(before)],
    )
    procs.append(start_worker(tmp_path, topics.env([model_server]), "w0"))
    await produce(
        topics.bootstrap,
        topics.prompts,
        [
            submit_event(during, "a long story", 1000, topics.tokens, 1),
            submit_event(after, "a short one", 5, topics.tokens, 2),
        ],
    )
    got = await collect(topics.bootstrap, topics.tokens, [before, after])
    await asyncio.sleep(1.0)  # `during` is streaming now (5 ms per token)
    await produce(topics.bootstrap, topics.prompts, [cancel_event(during), cancel_event(after)])
    got = await collect(topics.bootstrap, topics.tokens, [before, during, after])

    st = got.check_contract(before)
    assert st.status == "cancelled"
    assert [e.WhichOneof("body") for e in got.events[before]] == ["completed"]
    assert st.completion_tokens == 0

    st = got.check_contract(during)
    assert st.status == "cancelled", (st.finish_reason, st.finish_message, st.error_code)
    assert 0 < st.completion_tokens < 1000
    assert st.completion_tokens == len(st.token_ids)

    await asyncio.sleep(0.5)
    got = await collect(topics.bootstrap, topics.tokens, [after])
    st = got.check_contract(after)
    assert st.status == "completed" and st.finish_reason == "length"
    assert await committed_equals_end(topics)


async def test_poison_records_go_to_dlq(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    procs.append(start_worker(tmp_path, topics.env([model_server]), "w0"))
    producer = AIOKafkaProducer(**kafka.Connection(topics.bootstrap).client_kwargs("test"))
    await producer.start()
    future_version = submit_event("r-future", "x", 5, topics.tokens, 0)
    future_version.schema_version = 99
    try:
        await producer.send_and_wait(topics.prompts, b"\xff\x00garbage", key=b"k1", partition=0)
        await producer.send_and_wait(
            topics.prompts, future_version.SerializeToString(), key=b"r-future", partition=0
        )
    finally:
        await producer.stop()
    ok, bad_route = rid(), rid()
    await produce(
        topics.bootstrap,
        topics.prompts,
        [
            submit_event(bad_route, "nowhere", 5, topics.tokens, 7),
            submit_event(ok, "still alive", 5, topics.tokens, 0),
        ],
    )
    got = await collect(topics.bootstrap, topics.tokens, [ok, "r-future"])
    assert got.check_contract(ok).status == "completed"
    # The newer-version submit still names its request, tenant and reply partition: its client
    # is told (one terminal `failed`, nothing generated). The others name nobody: DLQ only.
    future = got.check_contract("r-future")
    assert (future.status, future.error_code, future.attempts) == ("failed", "dead_lettered", 0)
    assert future.finish_message == (
        "the request could not be processed: schema_version 99 is newer than supported 1"
    )
    assert got.partitions["r-future"] == {0}

    consumer = AIOKafkaConsumer(
        topics.dlq,
        **kafka.Connection(topics.bootstrap).client_kwargs("test"),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        records = []
        for _ in range(20):
            batch = await consumer.getmany(timeout_ms=500)
            records += [r for recs in batch.values() for r in recs]
            if len(records) >= 3:
                break
    finally:
        await consumer.stop()
    assert len(records) == 3
    headers = [{k: v.decode() for k, v in r.headers} for r in records]
    reasons = sorted(h["dlq-reason"] for h in headers)
    assert "not a protobuf Event" in reasons[0] or "schema_version" in reasons[0]
    assert "reply partition 7 does not exist" in reasons[1]
    assert "newer than supported" in reasons[2]
    assert {h["dlq-by"] for h in headers} == {"w0"}
    # dlq-source: "<topic>/<partition>@<offset>"; the garbage was the first record of partition 0.
    sources = [h["dlq-source"].rpartition("/") for h in headers]
    assert {topic for topic, _, _ in sources} == {topics.prompts}
    first = min(range(3), key=lambda i: tuple(map(int, sources[i][2].split("@"))))
    assert records[first].value == b"\xff\x00garbage"
    assert await committed_equals_end(topics)  # every record handled, its writes acknowledged
    # Nothing on the tokens topic for the garbage or the impossible route.
    assert {e.request_id for e in await read_all(topics.bootstrap, topics.tokens)} == {
        ok,
        "r-future",
    }


def blocked_term(ref: str) -> str:
    """A word of the second half of `ref` whose first occurrence is in the second half."""
    half = len(ref) // 2
    words = sorted({w.strip(".,\n") for w in ref[half:].split()}, key=len, reverse=True)
    for w in words:
        if len(w) >= 4 and ref.lower().find(w.lower()) >= half:
            return w
    raise AssertionError("no usable word")


async def test_limits_filter_and_inflight_bound(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path
) -> None:
    ref, _ = await reference_text(model_server, "filter me", 200)
    term = blocked_term(ref)
    env = topics.env(
        [model_server], LLMSTREAM_WORKER_BLOCKLIST=term, LLMSTREAM_WORKER_MAX_INFLIGHT="4"
    )
    procs.append(start_worker(tmp_path, env, "w0"))
    filtered, slow = rid(), rid()
    bounded = [rid() for _ in range(10)]
    await produce(
        topics.bootstrap,
        topics.prompts,
        [
            submit_event(filtered, "filter me", 200, topics.tokens, 0),
            *(submit_event(r, f"b{i}", 30, topics.tokens, 2) for i, r in enumerate(bounded)),
        ],
    )
    await collect(topics.bootstrap, topics.tokens, [filtered])
    # The wall-time limit counts from submission (event_time): submit once the worker runs.
    await produce(
        topics.bootstrap,
        topics.prompts,
        [submit_event(slow, "too slow", 1000, topics.tokens, 1, timeout_ms=400)],
    )
    got = await collect(topics.bootstrap, topics.tokens, [filtered, slow, *bounded])

    st = got.check_contract(filtered)
    assert st.finish_reason == "content_filter" and st.status == "completed"
    assert ref.startswith(st.text) and term.lower() not in st.text.lower()
    assert len(st.text) > len(ref) // 2 - 40  # it streamed up to the blocked term

    st = got.check_contract(slow)
    assert st.finish_reason == "timeout"
    assert 0 < st.completion_tokens < 1000

    spans = []
    for r in [filtered, slow, *bounded]:
        evs = got.events[r]
        assert got.check_contract(r).status == "completed"
        spans.append((evs[0].event_time.ToNanoseconds(), +1))
        spans.append((evs[-1].event_time.ToNanoseconds(), -1))
    running = peak = 0
    for _, step in sorted(spans, key=lambda s: (s[0], s[1])):
        running += step
        peak = max(peak, running)
    assert peak <= 4


async def test_no_model_server_fails_with_model_unavailable(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    env = topics.env(dead, LLMSTREAM_WORKER_RETRIES="2", LLMSTREAM_WORKER_BACKOFF_MS="20")
    procs.append(start_worker(tmp_path, env, "w0"))
    r = rid()
    await produce(topics.bootstrap, topics.prompts, [submit_event(r, "x", 5, topics.tokens, 0)])
    got = await collect(topics.bootstrap, topics.tokens, [r])
    st = got.check_contract(r)
    assert st.status == "failed" and st.error_code == "model_unavailable"
    assert "after 3 tries" in st.finish_message
    assert [e.WhichOneof("body") for e in got.events[r]] == ["failed"]


async def test_cancel_reaches_a_worker_at_its_inflight_bound(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path
) -> None:
    """At the bound the prompt partitions are paused; cancels are still applied at once (a
    running request stops, a queued one never starts)."""
    env = topics.env([model_server], LLMSTREAM_WORKER_MAX_INFLIGHT="2")
    procs.append(start_worker(tmp_path, env, "w0"))
    await wait_assigned(procs, topics.partitions)
    running = [rid(), rid()]
    queued = [rid(), rid()]
    await produce(
        topics.bootstrap,
        topics.prompts,
        [submit_event(r, f"long {i}", 1000, topics.tokens, 0) for i, r in enumerate(running)],
    )
    assert await wait_progress(topics.bootstrap, topics.tokens, running, 2) == 2
    # Only now the queued ones: the worker is at its bound, so they wait behind the long ones
    # (submitted together, a short one could be fetched first and finish before its cancel).
    await produce(
        topics.bootstrap,
        topics.prompts,
        [submit_event(r, f"queued {i}", 20, topics.tokens, 0) for i, r in enumerate(queued)],
    )
    t0 = asyncio.get_running_loop().time()
    await produce(
        topics.bootstrap, topics.prompts, [cancel_event(running[0]), cancel_event(queued[1])]
    )
    got = await collect(topics.bootstrap, topics.tokens, [running[0]], within_s=10)
    assert asyncio.get_running_loop().time() - t0 < 2.5  # not after the 5 s generation
    assert got.check_contract(running[0]).status == "cancelled"
    got = await collect(topics.bootstrap, topics.tokens, running + queued, within_s=30)
    st = got.check_contract(queued[1])
    assert st.status == "cancelled"
    assert [e.WhichOneof("body") for e in got.events[queued[1]]] == ["completed"]
    assert got.check_contract(queued[0]).finish_reason == "length"
    assert got.check_contract(running[1]).finish_reason == "length"
    assert await committed_equals_end(topics)
