"""The chaos suite's verdicts (llmstream_tools/chaos/check.py): what counts as lost, duplicated, a
billing mismatch, and how recovery time is read from frame arrival times."""

from __future__ import annotations

import argparse

import pytest

from llmstream.fold import RequestState, Status
from llmstream_tools.chaos.check import (
    ClientStream,
    FaultResult,
    LedgerRow,
    judge_request,
    quota_mismatches,
    recovery_seconds,
    stream_recoveries,
    table,
    tally,
)
from llmstream_tools.chaos.runner import FAULTS, add_arguments, main, options_from

EXPECTED = "alpha beta gamma"


def stream(
    parts: list[tuple[float, int, str]], done_at: float | None = 9.0, **done: object
) -> ClientStream:
    s = ClientStream("r1", "p", submitted_at=0.0, tokens=list(parts))
    if done_at is not None:
        frame = {"type": "done", "finish_reason": "length", "last_seq": len(parts), **done}
        s.dones.append((done_at, frame))
    return s


def logged(text: str = EXPECTED, **kw: object) -> RequestState:
    st = RequestState("r1", status=Status.COMPLETED, text_parts=[text])
    st.prompt_tokens, st.completion_tokens = 5, 3
    for k, v in kw.items():
        setattr(st, k, v)
    return st


GOOD = [(1.0, 1, "alpha"), (2.0, 2, " beta"), (3.0, 3, " gamma")]


def test_a_complete_stream_billed_once_is_clean() -> None:
    v = judge_request(stream(GOOD), EXPECTED, logged(), LedgerRow(1, 5, 3))
    assert (v.lost, v.duplicated, v.billing_mismatch, v.reasons) == (False, False, False, [])


def test_repeated_seq_is_a_duplicate_not_a_wrong_text() -> None:
    v = judge_request(stream([*GOOD[:2], (2.5, 2, " beta"), GOOD[2]], last_seq=3), EXPECTED,
                      logged(), LedgerRow(1, 5, 3))  # fmt: skip
    assert v.duplicated and not v.lost


def test_two_done_frames_or_two_terminal_events_are_duplicates() -> None:
    s = stream(GOOD)
    s.dones.append((9.5, dict(s.dones[0][1])))
    assert judge_request(s, EXPECTED, logged(), LedgerRow(1, 5, 3)).duplicated
    v = judge_request(stream(GOOD), EXPECTED, logged(extra_terminals=1), LedgerRow(1, 5, 3))
    assert v.duplicated and not v.lost


def test_gap_missing_done_or_other_text_is_lost() -> None:
    gap = judge_request(stream([GOOD[0], GOOD[2]], last_seq=3), EXPECTED, logged(), None)
    assert gap.lost
    assert judge_request(stream(GOOD, done_at=None), EXPECTED, logged(), LedgerRow(1, 5, 3)).lost
    wrong = [(1.0, 1, "alpha"), (2.0, 2, " beta"), (3.0, 3, " delta")]
    v = judge_request(stream(wrong), EXPECTED, logged("alpha beta delta"), LedgerRow(1, 5, 3))
    assert v.lost and not v.duplicated
    # No terminal event in the log although the client saw done.
    v = judge_request(stream(GOOD), EXPECTED, None, None)
    assert v.lost and not v.billing_mismatch


def test_a_cancelled_stream_must_be_a_prefix() -> None:
    s = stream(GOOD[:2], finish_reason="cancelled")
    assert not judge_request(s, EXPECTED, logged("alpha beta"), LedgerRow(1, 5, 3)).lost
    s = stream([(1.0, 1, "beta")], finish_reason="cancelled")
    assert judge_request(s, EXPECTED, logged("beta"), LedgerRow(1, 5, 3)).lost


def test_ledger_rows_must_be_one_with_the_logs_usage() -> None:
    for row in (None, LedgerRow(2, 10, 6), LedgerRow(1, 5, 4)):
        v = judge_request(stream(GOOD), EXPECTED, logged(), row)
        assert v.billing_mismatch and not v.lost, row
    no_terminal = RequestState("r1", status=Status.RUNNING)
    assert judge_request(stream(GOOD), EXPECTED, no_terminal, LedgerRow(1, 5, 3)).billing_mismatch


def test_quota_counters_must_equal_the_ledger() -> None:
    assert quota_mismatches(100, 100, 0) == []
    assert len(quota_mismatches(40, 100, 0)) == 1
    assert len(quota_mismatches(100, 100, 2)) == 1


def test_recovery_is_the_end_of_the_last_stall_after_the_fault() -> None:
    flowing = ClientStream("a", "p", 0.0, [(t / 10, i, "x") for i, t in enumerate(range(1, 200))])
    stalled = ClientStream("b", "p", 0.0, [(1.0, 1, "x"), (4.9, 2, "x"), (7.5, 3, "x")])
    stalled.dones.append((7.6, {}))
    finished_before = ClientStream("c", "p", 0.0, [(1.0, 1, "x")])
    finished_before.dones.append((1.5, {}))
    # Fault at 2.0, over at 2.1: b is silent 1.0 -> 4.9 (recovers 2.9 s after the fault),
    # then silent 4.9 -> 7.5 too, but that stall began long after the fault was over.
    per = stream_recoveries([flowing, stalled, finished_before], 2.0, 2.1, 1.0)
    assert per == [0.0, 4.9 - 2.0]
    assert recovery_seconds([flowing, stalled], 2.0, 2.1, 1.0) == 4.9 - 2.0
    # A stall that begins during a long fault counts even though it began after fault_at.
    late = ClientStream("d", "p", 0.0, [(1.9, 1, "x"), (5.0, 2, "x"), (20.0, 3, "x")])
    assert recovery_seconds([late], 2.0, 12.0, 1.0) == 18.0
    silent = ClientStream("e", "p", 0.0, [(1.0, 1, "x")])
    assert recovery_seconds([flowing, silent], 2.0, 2.1, 1.0) is None


def test_tally_and_table() -> None:
    r = FaultResult("worker", requests=2, in_flight=2, recovery_s=3.25)
    bad = judge_request(stream(GOOD), EXPECTED, logged(), None)
    good = judge_request(stream(GOOD), EXPECTED, logged(), LedgerRow(1, 5, 3))
    tally(r, [bad, good], ["quota day counter 1 != ledger total 2"])
    assert (r.lost, r.duplicated, r.billing_mismatches) == (0, 0, 2)
    assert not r.ok and len(r.examples) == 2
    lines = table([r, FaultResult("kafka", in_flight=5, dead_processes=["gateway"])]).splitlines()
    assert lines[2] == "| worker | 2 | 0 | 0 | 2 | 3.2 | 0.0 | all up |"
    assert lines[3] == "| kafka | 5 | 0 | 0 | 0 | never | 0.0 | died: gateway |"


def test_cli_options_quick_and_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    full = options_from(parser.parse_args([]))
    assert full.faults == list(FAULTS) and full.requests >= 100 and full.stall_s == 60
    quick = options_from(
        parser.parse_args(["--quick", "--faults", "kafka,stall", "--stall-s", "2"])
    )
    assert quick.quick and quick.faults == ["kafka", "stall"] and quick.stall_s == 2
    assert quick.requests < full.requests and quick.kafka_down_s < full.kafka_down_s
    with pytest.raises(SystemExit):
        main(["--faults", "worker,meteor"])
