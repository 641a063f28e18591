"""The shared fold: every property its callers rely on (see llmstream/fold.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from llmstream import codec
from llmstream.fold import RequestState, Status, fold, fold_all
from llmstream.v1 import common_pb2, events_pb2

RID = "req-1"


def ev(**body: object) -> events_pb2.Event:
    event = codec.new_event(RID, "tenant-a", "test")
    ((kind, value),) = body.items()
    getattr(event, kind).CopyFrom(value)
    return event


def submitted() -> events_pb2.Event:
    return ev(
        submitted=events_pb2.RequestSubmitted(
            model="m",
            max_tokens=8,
            reserved_tokens=12,
            reply=events_pb2.ReplyRoute(topic="t", partition=3, gateway_id="g0"),
        )
    )


def started(attempt: int = 1) -> events_pb2.Event:
    return ev(started=events_pb2.GenerationStarted(worker_id="w", attempt=attempt))


def delta(seq: int, text: str) -> events_pb2.Event:
    return ev(token_delta=events_pb2.TokenDelta(seq=seq, text=text, token_ids=[seq]))


def completed(
    last_seq: int, reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_STOP
) -> events_pb2.Event:
    return ev(
        completed=events_pb2.RequestCompleted(
            finish_reason=reason,
            last_seq=last_seq,
            usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=last_seq),
        )
    )


def run(events: list[events_pb2.Event]) -> RequestState:
    return fold_all(events)[RID]


def test_happy_path() -> None:
    s = run([submitted(), started(), delta(1, "Hel"), delta(2, "lo"), completed(2)])
    assert s.status is Status.COMPLETED
    assert s.text == "Hello"
    assert s.token_ids == [1, 2]
    assert (s.prompt_tokens, s.completion_tokens) == (4, 2)
    assert s.reply_partition == 3
    assert s.finish_reason == "stop"
    assert (s.duplicates, s.missing_seqs, s.extra_terminals) == (0, 0, 0)


def test_redelivered_delta_is_dropped_and_counted() -> None:
    s = run(
        [submitted(), delta(1, "a"), delta(2, "b"), delta(2, "b"), delta(1, "a"), delta(3, "c")]
    )
    assert s.text == "abc"
    assert s.duplicates == 2
    assert s.missing_seqs == 0


def test_gap_is_counted_not_hidden() -> None:
    s = run([submitted(), delta(1, "a"), delta(4, "d"), completed(6)])
    assert s.missing_seqs == 2 + 2  # seq 2-3 missing, and 5-6 promised by the terminal event
    assert s.text == "ad"


def test_second_terminal_never_rebills() -> None:
    s = run(
        [
            submitted(),
            delta(1, "a"),
            completed(1),
            completed(1),
            ev(failed=events_pb2.RequestFailed(code="internal")),
        ]
    )
    assert s.status is Status.COMPLETED
    assert s.extra_terminals == 2
    assert s.completion_tokens == 1


def test_status_never_moves_back_across_topics() -> None:
    # A reader of both topics may see the tokens topic first.
    s = run([started(), delta(1, "x"), completed(1), submitted()])
    assert s.status is Status.COMPLETED
    assert s.model == "m"


def test_order_of_interleaving_topics_does_not_change_the_result() -> None:
    prompt_events = [submitted(), ev(cancel_requested=events_pb2.CancelRequested(reason="client"))]
    token_events = [
        started(),
        delta(1, "a"),
        delta(2, "b"),
        completed(2, common_pb2.FINISH_REASON_CANCELLED),
    ]
    results = set()
    # Every interleaving that keeps each topic's own order.
    for positions in itertools.combinations(range(6), 2):
        merged, p, t = [], iter(prompt_events), iter(token_events)
        for i in range(6):
            merged.append(next(p) if i in positions else next(t))
        s = run(merged)
        results.add((s.status, s.text, s.cancel_requested, s.finish_reason, s.model))
    assert results == {(Status.CANCELLED, "ab", True, "cancelled", "m")}


def test_takeover_attempts_continue_seq() -> None:
    s = run([submitted(), started(1), delta(1, "a"), started(2), delta(2, "b"), completed(2)])
    assert s.attempts == 2
    assert s.text == "ab"
    assert s.status is Status.COMPLETED


def test_failed_is_terminal_with_code() -> None:
    s = run(
        [submitted(), ev(failed=events_pb2.RequestFailed(code="model_not_found", message="no m"))]
    )
    assert s.status is Status.FAILED
    assert s.error_code == "model_not_found"


def test_fold_refuses_foreign_event() -> None:
    other = codec.new_event("req-2", "tenant-a")
    other.submitted.model = "m"
    state = fold(None, submitted())
    try:
        fold(state, other)
    except ValueError as exc:
        assert "req-2" in str(exc)
    else:
        raise AssertionError("fold accepted another request's event")


def test_as_dict_is_json_ready() -> None:
    import json

    s = run([submitted(), delta(1, 'é\n"🙂'), completed(1)])
    data = json.loads(json.dumps(s.as_dict()))
    assert data["text"] == 'é\n"🙂'
    assert data["status"] == "completed"


def test_submitted_seen_marks_the_submit_event_only() -> None:
    assert not run([started(), delta(1, "a"), completed(1)]).submitted_seen
    assert run([started(), completed(0), submitted()]).submitted_seen


def test_from_dict_round_trips_as_dict() -> None:
    import json

    s = run([submitted(), started(), delta(1, "Hel"), delta(3, "lo"), completed(3)])
    data = json.loads(json.dumps(s.as_dict()))
    back = RequestState.from_dict(data)
    assert back.as_dict() == {**s.as_dict(), "tokens_folded": 0}
    assert back.text == "Hello" and back.token_ids == []


def test_from_dict_tolerates_unknown_and_missing_keys() -> None:
    back = RequestState.from_dict({"request_id": RID, "status": "running", "future_field": 1})
    assert back.status is Status.RUNNING
    assert back.model == "" and back.text == ""


def test_persist_and_resume_anywhere_equals_one_fold() -> None:
    # The aggregator persists state between batches (as_dict without token ids) and resumes
    # with from_dict: the result must not depend on where the log was cut.
    events = [
        started(),
        delta(1, "a"),
        submitted(),
        delta(2, "b"),
        delta(2, "b"),
        ev(cancel_requested=events_pb2.CancelRequested(reason="client")),
        delta(4, "d"),
        completed(4, common_pb2.FINISH_REASON_CANCELLED),
        completed(4),
    ]
    whole = run(events).as_dict()
    whole.pop("tokens_folded")
    for cuts in itertools.chain.from_iterable(
        itertools.combinations(range(1, len(events)), k) for k in (1, 2, 3)
    ):
        state: RequestState | None = None
        start = 0
        for end in (*cuts, len(events)):
            for event in events[start:end]:
                state = fold(state, event)
            assert state is not None
            state = RequestState.from_dict(state.as_dict())
            start = end
        assert state is not None
        resumed = state.as_dict()
        resumed.pop("tokens_folded")
        assert resumed == whole, cuts


def fenced(event: events_pb2.Event, generation: int, attempt: int) -> events_pb2.Event:
    event.fence.generation, event.fence.attempt = generation, attempt
    return event


def test_a_zombies_events_after_a_newer_owner_are_ignored() -> None:
    # Worker A (generation 3) streamed seq 1-2, froze, lost the partition; worker B (generation
    # 5) took over after seq 2. A resumes and writes on: its deltas, its retry's `started`
    # (attempt 2 by A's own count) and its terminal are older than B's fence.
    s = run(
        [
            submitted(),
            fenced(started(1), 3, 1),
            fenced(delta(1, "a"), 3, 1),
            fenced(delta(2, "b"), 3, 1),
            fenced(started(2), 5, 2),
            fenced(delta(3, "C"), 5, 2),
            fenced(delta(3, "x"), 3, 1),
            fenced(delta(4, "y"), 3, 1),
            fenced(started(2), 3, 2),
            fenced(completed(4), 3, 1),
            fenced(delta(4, "D"), 5, 2),
            fenced(completed(4), 5, 2),
        ]
    )
    assert s.text == "abCD" and s.status is Status.COMPLETED
    assert (s.fence_generation, s.fence_attempt) == (5, 2)
    assert s.fenced == 4 and s.extra_terminals == 0 and s.duplicates == 0
    assert s.worker_id == "w" and s.attempts == 2


def test_a_newer_attempt_of_the_same_owner_fences_the_older() -> None:
    s = run(
        [
            fenced(started(1), 4, 1),
            fenced(delta(1, "a"), 4, 1),
            fenced(started(2), 4, 2),
            fenced(delta(2, "late"), 4, 1),
            fenced(delta(2, "b"), 4, 2),
        ]
    )
    assert s.text == "ab" and s.fenced == 1


def test_unfenced_events_are_never_stale() -> None:
    # The gateway's events carry no fence, nor do events of workers older than fencing.
    s = run([fenced(started(1), 7, 1), submitted(), delta(1, "a"), completed(1)])
    assert s.text == "a" and s.fenced == 0 and s.submitted_seen


def test_fencing_survives_persist_and_resume() -> None:
    events = [
        fenced(started(1), 3, 1),
        fenced(delta(1, "a"), 3, 1),
        fenced(started(2), 5, 2),
        fenced(delta(2, "late"), 3, 1),
        fenced(delta(2, "b"), 5, 2),
    ]
    state = None
    for event in events:
        state = RequestState.from_dict(fold(state, event).as_dict())
    assert state is not None and state.text == "ab" and state.fenced == 1


# -- compact token events (docs/events.md, "Token events") fold like full ones ----------------


@dataclass(frozen=True)
class Rec:
    key: bytes
    value: bytes
    timestamp: int


def attempt_records(compact: bool, deltas: list[tuple[str, list[int]]]) -> list[Rec]:
    """One request's tokens-topic records as a worker writes them, timestamps as Kafka stamps
    them (the producer's clock, milliseconds)."""
    env = codec.new_event("req_7", "t_1", "worker-1")
    env.trace.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    env.fence.generation, env.fence.attempt = 3, 1
    env.event_time.FromMilliseconds(1_000)
    started = events_pb2.Event()
    started.CopyFrom(env)
    started.started.attempt = 1
    out = [Rec(b"req_7", codec.encode(started), 1_000)]
    enc = codec.TokenDeltaEncoder(env, compact=compact)
    for seq, (text, ids) in enumerate(deltas, start=1):
        value = enc.value(seq, text, ids)
        if not compact:  # the full shape stamps its own clock: make it the record's
            ev = codec.decode(value)
            ev.event_time.FromMilliseconds(1_000 + seq)
            value = codec.encode(ev)
        out.append(Rec(b"req_7", value, 1_000 + seq))
    done = events_pb2.Event()
    done.CopyFrom(env)
    done.event_time.FromMilliseconds(2_000)
    done.completed.finish_reason = common_pb2.FINISH_REASON_STOP
    done.completed.usage.completion_tokens = sum(len(ids) for _, ids in deltas)
    done.completed.last_seq = len(deltas)
    out.append(Rec(b"req_7", codec.encode(done), 2_000))
    return out


def fold_records(records: list[Rec]) -> RequestState:
    state = None
    for rec in records:
        state = fold(state, codec.decode_record(rec))
    assert state is not None
    return state


@given(
    st.lists(
        st.tuples(st.text(max_size=12), st.lists(st.integers(0, 50_000), max_size=8)),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 22),
)
def test_compact_token_events_fold_to_the_same_state(
    deltas: list[tuple[str, list[int]]], switch: int
) -> None:
    full = attempt_records(False, deltas)
    compact = attempt_records(True, deltas)
    want = fold_records(full).as_dict()
    assert fold_records(compact).as_dict() == want
    assert want["first_token_at_ms"] == 1_001 and want["tenant_id"] == "t_1"
    # A worker upgraded mid-request (or a replay across the change): old and new records mixed.
    assert fold_records(full[:switch] + compact[switch:]).as_dict() == want
