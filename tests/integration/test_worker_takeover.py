"""Takeover without client-visible loss: kill -9 of a worker, SIGTERM drain, model server loss.

Each test compares every request's concatenated text and token ids with an uninterrupted run
of the same prompt straight from a model server (the synthetic engine is deterministic), and
checks seq 1..n without gap or repeat and exactly one terminal event.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from llmstream.fold import is_terminal
from llmstream.ports import free_port
from llmstream.v1 import events_pb2
from llmstream_tools.testing.worker import (
    Collected,
    Proc,
    Topics,
    collect,
    produce,
    prompt_text,
    read_all,
    reference_text,
    start_model_server,
    start_worker,
    submit_event,
    submit_streaming,
    wait_model_server,
)
from llmstream_tools.testing.worker_fixtures import worker_procs, worker_topics

pytestmark = pytest.mark.integration
# Fixtures of llmstream_tools.testing.worker_fixtures, under the names the tests use.
topics = worker_topics
procs = worker_procs


async def model_server(procs: list[Proc], tmp: Path, port: int | None = None) -> str:
    port = port or free_port()
    procs.append(start_model_server(tmp, port, itl_ms=5, ttft_ms=5))
    addr = f"127.0.0.1:{port}"
    await wait_model_server(addr)
    return addr


async def two_replicas_one_worker(
    topics: Topics, procs: list[Proc], tmp: Path, port_a: int | None = None
) -> tuple[str, str]:
    """Model servers A (procs[0]) and B, and worker w0 using both (short retry backoff)."""
    addr_a = await model_server(procs, tmp, port_a)
    addr_b = await model_server(procs, tmp)
    env = topics.env([addr_a, addr_b], LLMSTREAM_WORKER_BACKOFF_MS="50")
    procs.append(start_worker(tmp, env, "w0"))
    return addr_a, addr_b


async def check_equal_to_uninterrupted(
    got: Collected, addr: str, ids: list[str], prompts: list[str], max_tokens: int
) -> None:
    refs = await asyncio.gather(*(reference_text(addr, p, max_tokens) for p in prompts))
    for r, (text, token_ids) in zip(ids, refs, strict=True):
        st = got.check_contract(r)
        assert st.status == "completed", (r, st.finish_reason, st.finish_message)
        assert st.duplicates == 0 and st.missing_seqs == 0
        assert st.token_ids == token_ids, r
        assert st.text == text, r
        assert st.completion_tokens == max_tokens


def submits(
    topics: Topics, n: int, max_tokens: int
) -> tuple[list[str], list[str], list[events_pb2.Event]]:
    ids = [f"r-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    prompts = [prompt_text(i) for i in range(n)]
    events = [
        submit_event(r, p, max_tokens, topics.tokens, i % topics.partitions)
        for i, (r, p) in enumerate(zip(ids, prompts, strict=True))
    ]
    return ids, prompts, events


async def test_kill9_worker_mid_generation_is_taken_over(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    addr = await model_server(procs, tmp_path)
    env = topics.env([addr])
    w0 = start_worker(tmp_path, env, "w0")
    procs.append(w0)
    n, max_tokens = 50, 400  # ~2 s per generation at 5 ms per token
    ids, prompts, events = submits(topics, n, max_tokens)
    await submit_streaming(topics, events)
    w0.kill()
    before = await read_all(topics.bootstrap, topics.tokens)
    assert not any(is_terminal(e) for e in before)

    procs.append(start_worker(tmp_path, env, "w1"))
    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=40)
    await check_equal_to_uninterrupted(got, addr, ids, prompts, max_tokens)
    for r in ids:
        st = got.state(r)
        assert st.attempts == 2 and st.worker_id == "w1", (r, st.attempts, st.worker_id)
        resumed = [e.started for e in got.events[r] if e.HasField("started")][-1]
        assert 0 < resumed.resumed_after_seq < st.last_seq


async def test_sigterm_drain_finishes_short_and_hands_over_long(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    addr = await model_server(procs, tmp_path)
    env = topics.env([addr], LLMSTREAM_WORKER_DRAIN_TIMEOUT_S="1.5")
    w0 = start_worker(tmp_path, env, "w0")
    procs.append(w0)
    long_ids, long_prompts, long_events = submits(topics, 10, 1000)  # ~5 s each
    await submit_streaming(topics, long_events)
    short_ids, short_prompts, short_events = submits(topics, 10, 60)  # ~0.3 s each
    await produce(topics.bootstrap, topics.prompts, short_events)
    await asyncio.sleep(0.1)
    assert await asyncio.to_thread(w0.term, 15) == 0
    logged = await read_all(topics.bootstrap, topics.tokens)
    terminal = {e.request_id for e in logged if is_terminal(e)}
    assert terminal == set(short_ids), "drain: short requests finish, long ones are left"

    procs.append(start_worker(tmp_path, env, "w1"))
    got = await collect(topics.bootstrap, topics.tokens, long_ids + short_ids, within_s=30)
    await check_equal_to_uninterrupted(got, addr, short_ids, short_prompts, 60)
    await check_equal_to_uninterrupted(got, addr, long_ids, long_prompts, 1000)
    assert all(got.state(r).worker_id == "w0" for r in short_ids)
    assert all(got.state(r).worker_id == "w1" for r in long_ids)


async def test_model_server_killed_mid_stream(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    port_a = free_port()
    addr_a, addr_b = await two_replicas_one_worker(topics, procs, tmp_path, port_a)
    n, max_tokens = 20, 400
    ids, prompts, events = submits(topics, n, max_tokens)
    await submit_streaming(topics, events)
    procs[0].kill()  # model server A
    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=30)
    await check_equal_to_uninterrupted(got, addr_b, ids, prompts, max_tokens)
    moved = [r for r in ids if got.state(r).attempts > 1]
    assert moved, "some requests were on the killed server"
    assert all(got.state(r).model_server == addr_b for r in moved)

    # A restarted replica serves again (the worker reconnects to it).
    await model_server(procs, tmp_path, port_a)
    ids2, prompts2, events2 = submits(topics, 6, 20)
    await produce(topics.bootstrap, topics.prompts, events2)
    got2 = await collect(topics.bootstrap, topics.tokens, ids2, within_s=20)
    await check_equal_to_uninterrupted(got2, addr_a, ids2, prompts2, 20)


async def test_single_model_server_restarted_mid_stream(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    port = free_port()
    addr = await model_server(procs, tmp_path, port)
    procs.append(start_worker(tmp_path, topics.env([addr]), "w0"))
    n, max_tokens = 10, 400
    ids, prompts, events = submits(topics, n, max_tokens)
    await submit_streaming(topics, events)
    procs[0].kill()
    await asyncio.sleep(0.3)
    await model_server(procs, tmp_path, port)  # same address: the worker's retries reach it
    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=30)
    await check_equal_to_uninterrupted(got, addr, ids, prompts, max_tokens)
    assert all(got.state(r).attempts >= 2 for r in ids)


async def test_model_server_drain_moves_streams_to_another_replica(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    """SIGTERM on a model server cancels its streams ("shutdown"): not a client cancel, so
    the worker continues them on the other replica."""
    _, addr_b = await two_replicas_one_worker(topics, procs, tmp_path)
    n, max_tokens = 10, 400
    ids, prompts, events = submits(topics, n, max_tokens)
    await submit_streaming(topics, events)
    await asyncio.to_thread(procs[0].term, 15)
    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=30)
    await check_equal_to_uninterrupted(got, addr_b, ids, prompts, max_tokens)
    assert any(got.state(r).attempts > 1 for r in ids)
