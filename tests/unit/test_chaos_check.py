"""The chaos suite's verdicts (llmstream_tools/chaos/check.py): a request is kept only when its
client got the whole expected text, once, ending `stop`/`length`, and it is billed once;
every other outcome lands in its own column. Also: tenant billing across the ledger, the
rollup, Redis and the duplicate-bill counter; new submits during a fault; fault proofs; stall
spreads and the recovery goals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from llmstream import codec
from llmstream.fold import RequestState, Status
from llmstream.v1 import common_pb2, events_pb2
from llmstream_tools.chaos.check import (
    FAILED,
    KEPT,
    MISSING_DONE,
    TRUNCATED,
    WRONG_TEXT,
    BillingFindings,
    ClientStream,
    FaultResult,
    LedgerRow,
    Probe,
    TenantBilling,
    judge_probe,
    judge_request,
    judge_tenant,
    process_killed,
    server_restarted,
    table,
    tally,
)
from llmstream_tools.chaos.options import CLUSTER_FAULTS, FAULTS, default_faults
from llmstream_tools.chaos.owner import judge_owner, owner_truth
from llmstream_tools.chaos.recovery import (
    first_frames_after,
    goal_verdict,
    longest_silences,
    spread,
)
from llmstream_tools.chaos.runner import add_arguments, main, options_from

EXPECTED = "alpha beta gamma"
GOOD = [(1.0, 1, "alpha"), (2.0, 2, " beta"), (3.0, 3, " gamma")]
BILL = LedgerRow(1, 5, 3)


def stream(
    parts: list[tuple[float, int, str]], done_at: float | None = 9.0, **done: object
) -> ClientStream:
    s = ClientStream("r1", "p", submitted_at=0.0, tokens=list(parts))
    if done_at is not None:
        frame = {"type": "done", "finish_reason": "length", "last_seq": len(parts), **done}
        s.dones.append((done_at, frame))
    return s


def logged(text: str = EXPECTED, **kw: object) -> RequestState:
    st = RequestState("r1", status=Status.COMPLETED, text_parts=[text], finish_reason="length")
    st.prompt_tokens, st.completion_tokens = 5, 3
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_a_complete_stream_billed_once_is_kept() -> None:
    v = judge_request(stream(GOOD), EXPECTED, logged(), BILL)
    assert v.kept and v.outcome == KEPT and v.reasons == []
    assert not (v.repeated_seq or v.gapped_seq or v.double_bill or v.billing_mismatch)


def test_an_empty_text_done_is_truncated_not_kept() -> None:
    # The old verdict passed this: an empty text is a prefix of every expected text.
    v = judge_request(stream([], last_seq=0), EXPECTED, logged(""), LedgerRow(1, 5, 0))
    assert v.outcome == TRUNCATED and not v.kept
    v = judge_request(stream(GOOD[:2]), EXPECTED, logged("alpha beta"), BILL)
    assert v.outcome == TRUNCATED


def test_an_error_finish_is_failed_even_with_a_prefix() -> None:
    s = stream(GOOD[:1], finish_reason="error", error_code="model_unavailable")
    v = judge_request(s, EXPECTED, logged("alpha", status=Status.FAILED), BILL)
    assert v.outcome == FAILED and "model_unavailable" in v.reasons[0]
    for reason in ("timeout", "cancelled", "content_filter"):
        s = stream(GOOD, finish_reason=reason)
        assert judge_request(s, EXPECTED, logged(), BILL).outcome == FAILED, reason


def test_a_missing_done_is_its_own_outcome() -> None:
    v = judge_request(stream(GOOD, done_at=None), EXPECTED, logged(), BILL)
    assert v.outcome == MISSING_DONE and not v.kept


def test_a_repeated_seq_is_flagged_and_not_kept() -> None:
    s = stream([*GOOD[:2], (2.5, 2, " beta"), GOOD[2]], last_seq=3)
    v = judge_request(s, EXPECTED, logged(), BILL)
    assert v.repeated_seq and v.outcome == KEPT  # the text itself is right...
    result = FaultResult("x", requests=1, in_flight=1, proof="")
    tally(result, [v], BillingFindings())
    assert result.repeated_seq == 1 and not result.ok  # ...but the request does not pass
    two_dones = stream(GOOD)
    two_dones.dones.append((9.5, dict(two_dones.dones[0][1])))
    assert judge_request(two_dones, EXPECTED, logged(), BILL).repeated_seq
    assert judge_request(stream(GOOD), EXPECTED, logged(extra_terminals=1), BILL).repeated_seq


def test_a_gap_on_the_client_or_in_the_log_is_flagged() -> None:
    v = judge_request(stream([GOOD[0], GOOD[2]], last_seq=3), EXPECTED, logged(), BILL)
    assert v.gapped_seq and v.outcome == WRONG_TEXT  # "alpha gamma" is no prefix either
    v = judge_request(stream(GOOD), EXPECTED, logged(missing_seqs=2), BILL)
    assert v.gapped_seq


def test_another_text_is_wrong_even_when_complete() -> None:
    wrong = [(1.0, 1, "alpha"), (2.0, 2, " beta"), (3.0, 3, " delta")]
    v = judge_request(stream(wrong), EXPECTED, logged("alpha beta delta"), BILL)
    assert v.outcome == WRONG_TEXT
    # The client's text must be the log's too.
    v = judge_request(stream(GOOD), EXPECTED, logged("alpha beta"), BILL)
    assert v.outcome == WRONG_TEXT


def test_error_frames_are_counted_and_fail_without_a_retry_hint() -> None:
    s = stream(GOOD)
    s.errors.append({"type": "error", "code": "internal", "request_id": "r1"})
    v = judge_request(s, EXPECTED, logged(), BILL)
    assert (v.error_frames, v.unhinted_errors) == (1, 1) and "internal" in v.reasons[0]
    result = FaultResult("x", requests=1, in_flight=1, proof="")
    tally(result, [v], BillingFindings())
    assert result.error_frames == 1 and not result.ok
    assert "1 (1 without retry hint)" in table([result])
    # A refusal the protocol says to retry (a resume while Redis restarts): counted, not failed.
    s.errors[0]["retry_after_ms"] = 1000
    v = judge_request(s, EXPECTED, logged(), BILL)
    result = FaultResult("x", requests=1, in_flight=1, proof="")
    tally(result, [v], BillingFindings())
    assert (result.error_frames, result.unhinted_errors) == (1, 0) and result.ok


def test_a_request_billed_twice_or_not_at_all() -> None:
    v = judge_request(stream(GOOD), EXPECTED, logged(), LedgerRow(2, 10, 6))
    assert v.double_bill and not v.billing_mismatch
    for row in (None, LedgerRow(1, 5, 4)):
        v = judge_request(stream(GOOD), EXPECTED, logged(), row)
        assert v.billing_mismatch and not v.double_bill, row
    running = RequestState("r1", status=Status.RUNNING)
    assert judge_request(stream(GOOD), EXPECTED, running, BILL).billing_mismatch
    # A done without a terminal event in the log: an answer nobody bills.
    assert judge_request(stream(GOOD), EXPECTED, None, None).billing_mismatch


def tenant(**kw: int) -> TenantBilling:
    base = dict(
        ledger_rows=2,
        ledger_tokens=100,
        daily_requests=2,
        daily_tokens=100,
        redis_day=100,
        redis_month=100,
        settled=2,
        open_streams=0,
        duplicate_bill_counter=0,
    )
    return TenantBilling(**{**base, **kw})


def test_tenant_stores_must_hold_what_the_ledger_holds() -> None:
    assert judge_tenant(tenant()) == BillingFindings()
    # More than the ledger anywhere is a double bill.
    for kw in (
        {"daily_requests": 3},
        {"daily_tokens": 140},
        {"redis_day": 140},
        {"redis_month": 140},
        {"settled": 3},
        {"duplicate_bill_counter": 1},
    ):
        found = judge_tenant(tenant(**kw))
        assert len(found.double_bills) == 1 and not found.mismatches, kw
    # Less is a mismatch; open reservations are a mismatch, not a double bill.
    found = judge_tenant(tenant(redis_day=60, daily_tokens=60))
    assert len(found.mismatches) == 2 and not found.double_bills
    found = judge_tenant(tenant(redis_day=140, redis_month=140, open_streams=1))
    assert len(found.mismatches) == 3 and not found.double_bills


def test_new_submits_are_served_whole_or_refused_with_a_retry_hint() -> None:
    kept = judge_request(stream(GOOD), EXPECTED, logged(), BILL)
    accepted = Probe("p0", "p", stream=stream(GOOD))
    assert judge_probe(accepted, kept) == "served"
    refused = Probe("p1", "p", refusal={"code": "overloaded", "retry_after_ms": 500})
    assert judge_probe(refused, None) == "refused"
    unmatchable = Probe("p2", "p", refusal={"code": "internal"})
    assert judge_probe(unmatchable, None).startswith("bad: refused with internal")
    assert judge_probe(Probe("p3", "p"), None) == "bad: never answered"
    failed = judge_request(
        stream([], last_seq=0, finish_reason="error"), EXPECTED, logged(""), BILL
    )
    assert judge_probe(Probe("p4", "p", stream=stream([])), failed).startswith("bad: accepted")
    result = FaultResult("x", requests=1, in_flight=1, proof="")
    tally(result, [kept], BillingFindings(), [("served", kept), ("bad: never answered", None)])
    assert result.probes == {"served": 1, "refused": 0, "bad": 1} and not result.ok


def test_faults_must_prove_they_happened() -> None:
    assert process_killed(-9, alive_after=False, port_open_after=False) == ""
    assert process_killed(-9, alive_after=False, port_open_after=None) == ""
    assert "not -9" in process_killed(0, alive_after=False, port_open_after=False)
    assert "alive" in process_killed(-9, alive_after=True, port_open_after=False)
    assert "port" in process_killed(-9, alive_after=False, port_open_after=True)
    assert server_restarted({"run_id": "a", "uptime_s": 50}, {"run_id": "b", "uptime_s": 1}) == ""
    assert server_restarted({"pid": 10}, {"pid": 11}) == ""
    assert server_restarted({"pid": 10}, {"pid": 10}).startswith("unchanged")
    assert "no restart" in server_restarted({"uptime_s": 5}, {"uptime_s": 9})
    assert server_restarted({"uptime_s": 50}, {"uptime_s": 1}) == ""


def test_longest_silence_per_in_flight_stream() -> None:
    flowing = ClientStream("a", "p", 0.0, [(t / 10, t, "x") for t in range(1, 100)])
    flowing.dones.append((10.0, {}))
    stalled = ClientStream("b", "p", 0.0, [(1.0, 1, "x"), (4.9, 2, "x"), (5.0, 3, "x")])
    stalled.dones.append((5.1, {}))
    finished_before = ClientStream("c", "p", 0.0, [(1.0, 1, "x")])
    finished_before.dones.append((1.5, {}))
    silent = ClientStream("d", "p", 0.0, [(1.0, 1, "x")])
    # Fault at 2.0: b was silent from its last frame (1.0) until 4.9.
    per = longest_silences([flowing, stalled, finished_before, silent], 2.0)
    assert per[1:] == [pytest.approx(3.9), None] and per[0] == pytest.approx(0.1)
    s = spread(per)
    assert (s.n, s.never, s.text()) == (2, 1, "never (1)") and s.max == pytest.approx(3.9)
    assert first_frames_after([flowing, stalled, silent], 3.0) == [pytest.approx(0.1), 1.9, None]
    # Up to a later step only: a silence still going on then counts up to it.
    assert longest_silences([stalled, silent], 2.0, until=3.0) == [2.0, 2.0]


def test_spread_and_goals() -> None:
    s = spread([float(i) for i in range(1, 101)])
    assert (s.p50, s.p99, s.max) == (50.0, 99.0, 100.0)
    assert s.text() == "50.0 / 99.0 / 100.0" and spread([]).text() == "-"
    assert goal_verdict("worker kill -9", spread([0.5, 1.9])) == "PASS"
    assert goal_verdict("worker kill -9", spread([0.5, 2.1])) == "MISS"
    assert goal_verdict("leader kill -9", spread([4.0, None])) == "MISS"


def test_table_has_a_column_per_outcome() -> None:
    r = FaultResult("worker", requests=3, in_flight=2, proof="", goal="worker kill -9")
    kept = judge_request(stream(GOOD), EXPECTED, logged(), BILL)
    empty = judge_request(
        stream([], last_seq=0), EXPECTED, logged("", completion_tokens=0), LedgerRow(1, 5, 0)
    )
    failed = judge_request(stream(GOOD, finish_reason="error"), EXPECTED, logged(), BILL)
    tally(r, [kept, empty, failed], BillingFindings(double_bills=["x"]))
    r.stall = spread([0.1, 9.0])
    assert (r.kept, r.outcomes[TRUNCATED], r.outcomes[FAILED], r.double_bills) == (1, 1, 1, 1)
    assert not r.ok and r.goal_result == "MISS"
    header, _, line = table([r]).splitlines()
    assert header.startswith("| fault | requests | in flight | kept | failed | truncated |")
    assert line == (
        "| worker | 3 | 2 | 1 | 1 | 1 | 0 | 0 | 0 | 0 | 0 | 1 | 0 | 0/0/0 "
        "| 0.1 / 9.0 / 9.0 | MISS ≤ 2 s | yes | all up |"
    )
    unproven = FaultResult("redis", proof="unchanged: {'pid': 1}", dead_processes=["gateway"])
    assert (
        table([unproven]).splitlines()[-1].endswith("| NO: unchanged: {'pid': 1} | died: gateway |")
    )


def test_cli_options_quick_and_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    full = options_from(parser.parse_args([]))
    assert full.faults == list(FAULTS) and full.brokers == 3 and full.requests >= 100
    quick = options_from(
        parser.parse_args(["--quick", "--faults", "kafka,stall", "--stall-s", "2"])
    )
    assert quick.quick and quick.faults == ["kafka", "stall"] and quick.stall_s == 2
    assert quick.requests < full.requests and quick.kafka_down_s < full.kafka_down_s
    # One broker has no leader to move: the cluster faults are left out or refused.
    assert options_from(parser.parse_args(["--quick"])).faults == default_faults(1, quick=True)
    assert not set(CLUSTER_FAULTS) & set(default_faults(1))
    assert "zombie" in default_faults(1) and "zombie" not in default_faults(1, quick=True)
    with pytest.raises(SystemExit):
        main(["--faults", "worker,meteor"])
    with pytest.raises(SystemExit):
        main(["--quick", "--faults", "kafka-leader"])


def event(producer: str, at_ms: int, **body: object) -> events_pb2.Event:
    ev = codec.new_event("r1", "t", producer)
    ev.event_time.FromMilliseconds(at_ms)
    ((kind, value),) = body.items()
    getattr(ev, kind).CopyFrom(value)
    return ev


def started(producer: str, at_ms: int, after: int) -> events_pb2.Event:
    return event(producer, at_ms, started=events_pb2.GenerationStarted(resumed_after_seq=after))


def delta(producer: str, at_ms: int, seq: int, text: str) -> events_pb2.Event:
    return event(producer, at_ms, token_delta=events_pb2.TokenDelta(seq=seq, text=text))


def done(producer: str, at_ms: int, completion: int) -> events_pb2.Event:
    usage = common_pb2.Usage(prompt_tokens=5, completion_tokens=completion)
    body = events_pb2.RequestCompleted(finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage)
    return event(producer, at_ms, completed=body)


def test_owner_truth_leaves_out_what_the_zombie_wrote_while_out() -> None:
    # A streamed seq 1-2, froze at 150; B was assigned at 200 and took over after seq 2; A
    # resumed and wrote on until its own new assignment at 400, after which it owns the
    # request again (a legitimate takeover of B's work).
    log = [
        started("A", 100, 0),
        delta("A", 110, 1, "a"),
        delta("A", 120, 2, "b"),
        delta("A", 140, 3, "late-sent"),  # sent before the freeze, landed after B's read
        started("B", 210, 2),
        delta("B", 220, 3, "C"),
        delta("A", 300, 4, "x"),  # the zombie, out of the group
        done("A", 301, 4),
        delta("B", 230, 4, "D"),
        started("A", 410, 4),
        delta("A", 420, 5, "E"),
        done("A", 430, 5),
        done("B", 240, 4),  # B's, after A took the request back: not the owner any more
    ]
    (truth,) = owner_truth(log, "A", (200, 400)).values()
    assert truth.text == "abCDE" and truth.last_seq == 5
    assert truth.usage == (5, 5) and truth.finish_reason == "length"
    assert truth.late_events == 2 and truth.taken_over


def test_owner_truth_finds_compact_deltas_writer_by_fence_generation() -> None:
    # The same story with compact token deltas (docs/events.md): no producer id, only the
    # fence; the writer is whoever's `started` carried that generation (A: 1, B: 2, A: 3).
    def fenced(ev: events_pb2.Event, generation: int) -> events_pb2.Event:
        ev.fence.generation = generation
        if ev.HasField("token_delta"):
            ev.ClearField("producer_id")
        return ev

    log = [
        fenced(started("A", 100, 0), 1),
        fenced(delta("A", 110, 1, "a"), 1),
        fenced(delta("A", 120, 2, "b"), 1),
        fenced(delta("A", 140, 3, "late-sent"), 1),
        fenced(started("B", 210, 2), 2),
        fenced(delta("B", 220, 3, "C"), 2),
        fenced(delta("A", 300, 4, "x"), 1),  # the zombie, out of the group
        fenced(done("A", 301, 4), 1),
        fenced(delta("B", 230, 4, "D"), 2),
        fenced(started("A", 410, 4), 3),
        fenced(delta("A", 420, 5, "E"), 3),
        fenced(done("A", 430, 5), 3),
        fenced(done("B", 240, 4), 2),
    ]
    assert not any(e.producer_id for e in log if e.HasField("token_delta"))
    (truth,) = owner_truth(log, "A", (200, 400)).values()
    assert truth.text == "abCDE" and truth.last_seq == 5
    assert truth.usage == (5, 5) and truth.late_events == 2 and truth.taken_over


def test_the_bill_must_be_the_owners() -> None:
    (truth,) = owner_truth([started("B", 1, 0), done("B", 2, 3)], "A", (0, None)).values()
    v = judge_request(stream(GOOD), EXPECTED, logged(), BILL)
    judge_owner(v, logged(), truth)
    assert not v.billing_mismatch
    judge_owner(v, logged(completion_tokens=4), truth)
    assert v.billing_mismatch and "stale attempt" in v.reasons[-1]


def test_a_run_record_renders_as_a_published_block(tmp_path: Path) -> None:
    from llmstream_tools.bench import publish
    from llmstream_tools.chaos.options import Options
    from llmstream_tools.chaos.runner import record

    good = FaultResult("gateway", requests=1, in_flight=1, proof="", goal="gateway kill -9")
    tally(good, [judge_request(stream(GOOD), EXPECTED, logged(), BILL)], BillingFindings())
    good.goal_measure = spread([0.2, 0.4])
    bad = FaultResult("kafka", requests=1, in_flight=1, proof="", notes=["x unfinished"])
    data = record(Options(), [good, bad], "20261207T000000Z", 600.0)
    (tmp_path / "r.json").write_text(json.dumps(data))
    doc = "<!-- bench-results: r.json -->\nstale\n<!-- /bench-results -->\n"
    out = publish.rendered(doc, tmp_path)
    assert "Source: `r.json`." in out and data["table"] in out and "stale" not in out
    assert "**gateway kill -9** ≤ 1 s" in out and "**PASS**, p50 0.2 s, p99 0.4 s" in out
    assert "**not every fault passed**" in out and "- `kafka`: x unfinished" in out
    assert publish.rendered(out, tmp_path) == out
