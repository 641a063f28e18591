"""Pure core of the worker: offsets, coalescing, routing, output filter, event envelopes."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmstream import codec
from llmstream.fold import fold
from llmstream.v1 import common_pb2
from worker.coalesce import Coalescer
from worker.core import Envelope, failure_code
from worker.filters import Blocklist
from worker.offsets import PartitionOffsets
from worker.routing import Router, backoff_s

# ------------------------------------------------------------------ offsets


def test_commit_waits_for_the_contiguous_prefix() -> None:
    po = PartitionOffsets()
    for off in (10, 11, 12, 13):
        po.add(off)
    assert po.to_commit() is None
    po.done(12)
    assert po.to_commit() is None  # 10 and 11 still running
    po.done(10)
    assert po.to_commit() == 11
    po.committed(11)
    assert po.to_commit() is None
    po.done(11)
    assert po.to_commit() == 13  # 10, 11, 12 done
    po.done(13)
    assert po.to_commit() == 14
    assert po.in_progress == 0


def test_offsets_tolerate_gaps_and_repeats() -> None:
    po = PartitionOffsets()
    po.add(5)
    po.add(9)  # gap (compaction, transaction markers)
    po.done(9)
    po.done(9)
    assert po.to_commit() is None
    po.done(5)
    assert po.to_commit() == 10
    po.done(3)  # unknown / older: ignored
    assert po.to_commit() == 10
    with pytest.raises(ValueError):
        po.add(9)


@given(st.permutations(list(range(30))))
def test_commit_never_passes_an_unfinished_record(order: list[int]) -> None:
    po = PartitionOffsets()
    for off in range(30):
        po.add(off)
    finished: set[int] = set()
    committed = 0
    for off in order:
        po.done(off)
        finished.add(off)
        prefix = 0
        while prefix in finished:
            prefix += 1
        commit = po.to_commit()
        if commit is not None:
            po.committed(commit)
            committed = commit
        assert committed == prefix  # exactly the finished prefix, never beyond
    assert committed == 30


# ------------------------------------------------------------------ coalescing


def test_idle_pipeline_sends_each_delta_at_once() -> None:
    c = Coalescer(max_delay_s=0.005, max_bytes=100)
    assert not c.due(0.0, previous_acked=True)  # empty
    c.add("a", [1], now=0.0)
    assert c.due(0.0, previous_acked=True)


def test_busy_pipeline_merges_until_delay_or_size() -> None:
    c = Coalescer(max_delay_s=0.005, max_bytes=8)
    c.add("ab", [1], now=0.0)
    c.add("cd", [2, 3], now=0.001)
    assert not c.due(0.002, previous_acked=False)
    assert c.deadline() == 0.005
    assert c.due(0.005, previous_acked=False)
    assert c.take() == ("abcd", [1, 2, 3], 2)
    assert c.empty and c.deadline() is None
    c.add("é" * 4, [4], now=1.0)  # 8 bytes
    assert c.due(1.0, previous_acked=False)


@given(
    st.lists(st.tuples(st.text(max_size=5), st.lists(st.integers(0, 99), max_size=3)), max_size=40),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_coalescing_keeps_every_token_once_in_order(
    deltas: list[tuple[str, list[int]]], acks: list[bool]
) -> None:
    c = Coalescer(max_delay_s=0.003, max_bytes=6)
    texts: list[str] = []
    ids: list[int] = []
    now = 0.0
    for (text, tids), acked in zip(deltas, acks, strict=False):
        now += 0.001
        c.add(text, tids, now)
        if c.due(now, acked):
            t, i, _ = c.take()
            texts.append(t)
            ids += i
    if not c.empty:
        t, i, _ = c.take()
        texts.append(t)
        ids += i
    assert "".join(texts) == "".join(t for t, _ in deltas)
    assert ids == [i for _, tids in deltas for i in tids]


# ------------------------------------------------------------------ routing


def test_least_inflight_and_failed_replicas_avoided() -> None:
    r = Router(["a", "b", "c"], cooldown_s=1.0)
    r.acquire("a")
    r.acquire("a")
    r.acquire("b")
    assert r.pick(0.0) == "c"
    r.failed("c", now=0.0)
    assert r.pick(0.5) == "b"
    assert r.pick(0.5, exclude={"b"}) == "a"
    assert r.pick(1.5) == "c"  # cooldown over
    r.failed("a", 2.0)
    r.failed("b", 2.0)
    r.failed("c", 2.0)
    assert r.pick(2.1) in {"a", "b", "c"}  # all cooling down: still pick one
    assert r.pick(2.1, exclude={"a", "b"}) == "c"


def test_ties_rotate() -> None:
    r = Router(["a", "b"])
    assert {r.pick(0.0) for _ in range(4)} == {"a", "b"}


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 1.0), (20, 1.0)):
        d = backoff_s(retry, 0.1, 1.0, rng)
        assert ceiling / 2 <= d <= ceiling
    delays = {round(backoff_s(3, 0.1, 1.0, rng), 6) for _ in range(20)}
    assert len(delays) > 10
    with pytest.raises(ValueError):
        backoff_s(0, 0.1, 1.0)


# ------------------------------------------------------------------ filter


def test_blocklist_catches_terms_split_across_deltas() -> None:
    f = Blocklist.parse("Secret Word, other").stream()
    assert f.check("this is a sec") is None
    assert f.check("ret w") is None
    assert f.check("ord here") == "secret word"
    g = Blocklist.parse("").stream()
    assert g.check("secret word") is None
    assert not Blocklist.parse(" , ")


# ------------------------------------------------------------------ events


def test_envelope_events_fold_to_a_completed_request() -> None:
    env = Envelope("r1", "t1", "w1", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=2)
    events = [
        env.started("w1", "ms:1", "v1", attempt=1, after_seq=0),
        env.delta(1, "he", [1]),
        env.delta(2, "llo", [2]),
        env.completed(common_pb2.FINISH_REASON_LENGTH, usage, None, last_seq=2),
    ]
    state = None
    for ev in events:
        ev = codec.decode(codec.encode(ev))
        assert ev.trace.traceparent.startswith("00-aaa")
        assert ("traceparent", ev.trace.traceparent.encode()) in codec.headers(ev)
        state = fold(state, ev)
    assert state is not None
    assert state.text == "hello" and state.token_ids == [1, 2]
    assert state.status == "completed" and state.finish_reason == "length"
    assert state.missing_seqs == 0
    failed = env.failed("model_unavailable", "down", usage, last_seq=2)
    assert fold(None, failed).error_code == "model_unavailable"


def test_failure_codes() -> None:
    assert failure_code(grpc.StatusCode.NOT_FOUND, "x") == "model_not_found"
    assert failure_code(grpc.StatusCode.INVALID_ARGUMENT, "bad top_p") == "invalid_request"
    assert failure_code(grpc.StatusCode.INVALID_ARGUMENT, "exceeds context") == "context_overflow"
    assert failure_code(grpc.StatusCode.UNAVAILABLE, "") == "model_unavailable"
    assert failure_code(grpc.StatusCode.INTERNAL, "") == "internal"
