"""Fast takeover (docs/worker.md): kill -9 of one of two workers while both stream; the model
servers report its broken watch, the survivor evicts it from the consumer group and continues
its requests at once, without waiting for the session timeout. A worker stopped with SIGTERM
says goodbye instead: nobody is told, nobody evicted.

Real Kafka, two real synthetic model servers paced like a model (20 ms per token) and two
worker processes. Every request must complete with the text and token ids of an uninterrupted
run, seq 1..n without gap or repeat, one terminal event; the dead worker's requests must be
continued by the survivor after the eviction. The longest silence of each in-flight stream
(gaps between its events' record timestamps, from its last event before the kill) is printed
as a benchmark number, not asserted (a timing assertion on a shared machine would be flaky).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest

from llmstream import codec
from llmstream.ports import free_port
from llmstream.v1 import events_pb2
from llmstream_tools.testing.worker import (
    Proc,
    Topics,
    collect,
    reader,
    reference_text,
    start_model_server,
    start_worker,
    submit_streaming,
    wait_assigned,
    wait_model_server,
)
from llmstream_tools.testing.worker_fixtures import worker_procs, worker_topics
from tests.integration.test_worker_takeover import submits

pytestmark = pytest.mark.integration
topics = worker_topics
procs = worker_procs

ITL_MS = 20.0
N_REQUESTS = 40
MAX_TOKENS = 200  # ~4 s per generation at 20 ms per token


async def read_timed(
    topics: Topics, ids: set[str]
) -> dict[str, list[tuple[int, events_pb2.Event]]]:
    """Every event of the requests in the tokens topic, with its record timestamp (ms)."""
    consumer = await reader(topics.bootstrap, topics.tokens)
    out: dict[str, list[tuple[int, events_pb2.Event]]] = {}
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while True:
            batch = await consumer.getmany(timeout_ms=300)
            for recs in batch.values():
                for rec in recs:
                    event = codec.decode_record(rec)
                    if event.request_id in ids:
                        out.setdefault(event.request_id, []).append((rec.timestamp, event))
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= ends[tp] for tp in ends):
                return out
    finally:
        await consumer.stop()


def longest_silence_s(timed: list[tuple[int, events_pb2.Event]], fault_ms: int) -> float | None:
    """The longest gap between a stream's events from its last event before the fault to its
    end; None when it had ended before the fault."""
    stamps = sorted(ts for ts, _ in timed)
    before = [ts for ts in stamps if ts <= fault_ms]
    after = [ts for ts in stamps if ts > fault_ms]
    if not after:
        return None
    prev = before[-1] if before else fault_ms
    gaps = [b - a for a, b in zip([prev, *after], after, strict=False)]
    return max(gaps) / 1000


def evictions(proc: Proc) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for line in proc.log_path.read_text(errors="replace").splitlines()
        if '"lost worker evicted from the group' in line
    ]


async def test_kill9_worker_is_evicted_and_its_streams_continue_at_once(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    addrs = []
    for _ in range(2):
        port = free_port()
        procs.append(start_model_server(tmp_path, port, itl_ms=ITL_MS, ttft_ms=ITL_MS))
        addrs.append(f"127.0.0.1:{port}")
    for addr in addrs:
        await wait_model_server(addr)
    # The default session timeout: without the eviction the dead worker's requests would wait
    # 10 s for it.
    env = topics.env(addrs, LLMSTREAM_WORKER_SESSION_TIMEOUT_MS="10000")
    w0 = start_worker(tmp_path, env, "w0")
    w1 = start_worker(tmp_path, env, "w1")
    procs += [w0, w1]
    await wait_assigned([w0, w1], topics.partitions)

    ids, prompts, events = submits(topics, N_REQUESTS, MAX_TOKENS)
    await submit_streaming(topics, events)
    fault_ms = int(time.time() * 1000)
    w0.kill()

    got = await collect(topics.bootstrap, topics.tokens, ids, within_s=60)
    refs = await asyncio.gather(*(reference_text(addrs[0], p, MAX_TOKENS) for p in prompts))
    taken_over = 0
    for r, (text, token_ids) in zip(ids, refs, strict=True):
        st = got.check_contract(r)
        assert st.status == "completed", (r, st.finish_reason, st.finish_message)
        assert st.duplicates == 0 and st.missing_seqs == 0 and st.fenced == 0, r
        assert st.token_ids == token_ids, r
        assert st.text == text, r
        assert st.completion_tokens == MAX_TOKENS
        started = [e.started for e in got.events[r] if e.HasField("started")]
        if started[0].worker_id == "w0":
            # The dead worker's request: continued by the survivor, after what w0 wrote.
            assert started[-1].worker_id == "w1", (r, [s.worker_id for s in started])
            assert started[-1].resumed_after_seq > 0, r
            taken_over += 1
    assert taken_over > 0, "w0 served none of the requests"

    # The takeover came from the eviction (a model server's notice), not from the session
    # timeout: the survivor evicted w0's member and then rebalanced.
    evicted = evictions(w1)
    assert [e["lost_worker"] for e in evicted] == ["w0"], w1.log()

    timed = await read_timed(topics, set(ids))
    silences = [s for r in ids if (s := longest_silence_s(timed[r], fault_ms)) is not None]
    assert len(silences) == N_REQUESTS  # every stream was in flight at the kill
    silences.sort()
    p50 = silences[math.ceil(0.5 * len(silences)) - 1]
    p99 = silences[math.ceil(0.99 * len(silences)) - 1]
    print(
        f"\nworker kill -9, {N_REQUESTS} streams, {taken_over} on the killed worker: longest "
        f"silence p50 {p50:.2f} s, p99 {p99:.2f} s, max {silences[-1]:.2f} s"
    )


async def wait_logged(proc: Proc, text: str, within_s: float = 30.0) -> None:
    """Until `text` is in the process's log (the timeout only guards against a hang)."""
    end = time.monotonic() + within_s
    while text not in proc.log_path.read_text(errors="replace"):
        assert time.monotonic() < end, f"not logged: {text}\n{proc.log()}"
        await asyncio.sleep(0.1)


async def test_sigterm_is_a_goodbye_not_a_death(
    topics: Topics, procs: list[Proc], tmp_path: Path
) -> None:
    port = free_port()
    server = start_model_server(tmp_path, port, itl_ms=ITL_MS, ttft_ms=ITL_MS)
    procs.append(server)
    addr = f"127.0.0.1:{port}"
    await wait_model_server(addr)
    env = topics.env([addr], LLMSTREAM_WORKER_SESSION_TIMEOUT_MS="10000")
    w0 = start_worker(tmp_path, env, "w0")
    w1 = start_worker(tmp_path, env, "w1")
    procs += [w0, w1]
    await wait_assigned([w0, w1], topics.partitions)

    assert await asyncio.to_thread(w0.term, 30) == 0
    await wait_logged(server, '"worker watch ended: the worker left", "worker_id": "w0"')
    await wait_assigned([w1], topics.partitions)  # w0 left the group itself
    assert "presumed dead" not in server.log_path.read_text(errors="replace")
    assert evictions(w1) == []
