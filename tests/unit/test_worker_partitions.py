"""Per-partition state (worker/partitions.py) and the pure parts of the cancel lookahead and the
takeover reader: what a record means for commits, pauses and runs."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from llmstream import codec
from llmstream.fold import RequestState
from llmstream.v1 import events_pb2
from worker.cancels import EarlyCancels, cancel_of
from worker.partitions import Partitions, Status
from worker.run import Run
from worker.takeover import fold_records

P0, P1 = TopicPartition("prompts", 0), TopicPartition("prompts", 1)


def run_at(tp: TopicPartition, offset: int, request_id: str) -> Run:
    return Run(tp, offset, 0, codec.new_event(request_id, "t1"), needs_lookup=False)


def assigned(*tps: TopicPartition) -> Partitions:
    p = Partitions()
    for tp in tps:
        p.assign(tp, end_offset=10, committed=None)
    return p


def test_assignment_records_the_takeover_bound_and_the_lookahead_start() -> None:
    p = Partitions()
    p.assign(P0, end_offset=5, committed=3)
    state = p.get(P0)
    assert state is not None and state.status is Status.ACTIVE
    assert state.lookahead_from == 3
    assert state.needs_lookup(4) and not state.needs_lookup(5)
    assert state.lag(8) == 5  # from the committed offset until the first commit
    state.offsets.committed(6)
    assert state.lag(8) == 2


def test_runs_finish_in_any_order_and_the_contiguous_prefix_is_committed() -> None:
    p = assigned(P0)
    state = p.get(P0)
    assert state is not None
    for offset in (3, 4, 5, 6):
        state.fetched(offset)
    first, second = run_at(P0, 3, "a"), run_at(P0, 4, "b")
    p.admit(first)
    p.admit(second)
    state.done(5)  # a cancel record: nothing to run
    assert p.inflight == 2 and p.run_of("b") is second
    p.finish(second)
    assert p.to_commit([P0]) == {}  # `first` still runs
    p.finish(first)
    assert p.to_commit([P0]) == {P0: 6}  # 6 is fetched, not done
    assert p.to_commit([P1]) == {}  # only what the consumer still has
    p.committed({P0: 6})
    assert p.to_commit([P0]) == {}
    assert p.inflight == 0 and p.run_of("a") is None
    assert p.known("a") and p.ended_recently("b")  # a repeated submit does nothing


def test_a_dropped_run_holds_its_partitions_commit_back() -> None:
    p = assigned(P0)
    state = p.get(P0)
    assert state is not None
    state.fetched(0)
    state.fetched(1)
    run = run_at(P0, 0, "a")
    p.admit(run)
    state.done(1)
    p.drop(run)  # abandoned: the next owner runs it again
    assert p.inflight == 0 and not p.known("a")
    assert p.to_commit([P0]) == {}
    p.finish(run)  # a late finish of a dropped run changes nothing
    assert p.to_commit([P0]) == {}


def test_partitions_pause_at_the_bound_and_resume_with_room() -> None:
    p = assigned(P0, P1)
    p.admit(run_at(P0, 0, "a"))
    assert p.room(2) == 1
    assert p.pause_changes(2, [P0, P1]) == ([], [])
    b = run_at(P1, 0, "b")
    p.admit(b)
    assert p.room(2) == 1  # at the bound: the fetch still asks for one record
    assert p.pause_changes(2, [P0, P1]) == ([P0, P1], [])
    assert p.pause_changes(2, [P0, P1]) == ([], [])  # already paused
    p.finish(b)
    assert p.pause_changes(2, [P0, P1]) == ([], [P0, P1])
    state = p.get(P0)
    assert state is not None and state.status is Status.ACTIVE


def test_revocation_forgets_the_partition_and_its_runs() -> None:
    p = assigned(P0, P1)
    a, b = run_at(P0, 0, "a"), run_at(P1, 0, "b")
    p.admit(a)
    p.admit(b)
    assert p.runs([P0]) == [a] and sorted(r.request_id for r in p.runs()) == ["a", "b"]
    p.revoke(P0)
    assert p.get(P0) is None and p.inflight == 1 and not p.current(a)
    p.finish(a)  # its task ending late: nothing to mark
    assert p.inflight == 1 and p.to_commit([P0, P1]) == {}


@given(st.permutations(list(range(20))), st.sets(st.integers(0, 19)))
def test_nothing_unfinished_is_ever_committed(order: list[int], dropped: set[int]) -> None:
    p = assigned(P0)
    state = p.get(P0)
    assert state is not None
    runs = [run_at(P0, offset, f"r{offset}") for offset in range(20)]
    for run in runs:
        state.fetched(run.offset)
        p.admit(run)
    for offset in order:
        (p.drop if offset in dropped else p.finish)(runs[offset])
        commit = p.to_commit([P0]).get(P0)
        if commit is not None:
            assert all(o not in dropped for o in range(commit))
            assert all(order.index(o) <= order.index(offset) for o in range(commit))


@dataclass
class Record:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp: int = -1  # a consumed record's milliseconds (-1: none); codec.decode_record reads it


def record(event: events_pb2.Event) -> Record:
    return Record(codec.key(event), codec.encode(event), codec.headers(event))


def test_the_lookahead_decodes_only_cancels() -> None:
    cancel = codec.new_event("r1", "t1")
    cancel.cancel_requested.reason = "client"
    assert cancel_of(record(cancel)) == ("r1", "client")
    submit = codec.new_event("r2", "t1")
    submit.submitted.model = "m"
    assert cancel_of(record(submit)) is None
    forged = Record(b"r3", b"\xff garbage", [("event-type", b"cancel_requested")])
    assert cancel_of(forged) is None

    early = EarlyCancels(limit=2)
    for rid in ("a", "b", "c"):
        early.remember(rid, f"why {rid}")
    assert early.pop("a") is None  # the oldest went first
    assert early.pop("c") == "why c" and early.pop("c") is None


def test_takeover_folds_only_the_wanted_requests() -> None:
    events = []
    for rid in ("r1", "r2"):
        started = codec.new_event(rid, "t1")
        started.started.attempt = 1
        d = codec.new_event(rid, "t1")
        d.token_delta.seq = 1
        d.token_delta.token_ids.extend([4, 5])
        events += [started, d]
    records = [record(e) for e in events] + [Record(b"r1", b"\xff", [])]
    states: dict[bytes, RequestState] = {}
    fold_records(states, records, {b"r1"})
    assert list(states) == [b"r1"]
    state = states[b"r1"]
    assert (state.attempts, state.token_ids, state.last_seq) == (1, [4, 5], 1)
