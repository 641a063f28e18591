"""Replay helpers that need no servers: time parsing, folding filters, progress, diffs."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest

from aggregator import replay, replay_cli
from aggregator.projection import Coords
from llmstream import codec
from llmstream_tools.testing import synthetic_events as synthetic


def test_parse_time_forms() -> None:
    now = 1_800_000_000_000
    assert replay.parse_time("1700000000123", now) == 1_700_000_000_123
    assert replay.parse_time("-15m", now) == now - 15 * 60_000
    assert replay.parse_time("2h ago", now) == now - 2 * 3_600_000
    assert replay.parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000_000
    assert replay.parse_time("2023-11-14T22:13:20", now) == 1_700_000_000_000  # naive = UTC
    assert replay.parse_time("2023-11-14T23:13:20+01:00", now) == 1_700_000_000_000
    with pytest.raises(replay.ReplayError, match="cannot read time"):
        replay.parse_time("yesterday-ish", now)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


def records_of(plans: list[synthetic.RequestPlan]) -> list[Record]:
    out = []
    for i, p in enumerate(synthetic.interleaved(plans, "p", "t")):
        out.append(Record(p.topic, 0, i, 0, codec.key(p.event), codec.encode(p.event)))
    return out


def test_fold_records_filters_one_request_and_keeps_its_history() -> None:
    plans = synthetic.plan(10, ["a"], ["m"], seed=2)
    records = [*records_of(plans), Record("t", 0, 999, 0, b"x", b"\x00junk")]
    folded = replay.Folded()
    terminal: list[str] = []
    replay.fold_records(records, folded, on_terminal=lambda s: terminal.append(s.request_id))
    assert len(folded.states) == 10 and sorted(terminal) == sorted(p.request_id for p in plans)
    assert len(folded.bad) == 1 and folded.bad[0].coords == Coords("t", 0, 999, 0)
    one = replay.Folded()
    target = plans[3].request_id
    replay.fold_records(records, one, request_id=target)
    assert list(one.states) == [target]
    assert len(one.history) == len(synthetic.events_of(plans[3], "p", "t"))
    assert one.records == len(records)


def test_progress_line_shows_rate_and_percent() -> None:
    out = io.StringIO()
    p = replay.Progress(total=200, out=out, every_s=0.0)
    p.add(50)
    p.finish()
    text = out.getvalue()
    assert "50/200 records (25%)" in text and "records/s" in text


def test_verify_sort_key_matches_bytewise_collation() -> None:
    keys = [("é",), ("z",), ("Z",), ("a-1",), ("a_1",)]
    assert sorted(keys, key=replay._sort_key) == sorted(keys, key=lambda k: k[0].encode())
    assert str(replay.Difference("requests", ("r1",), "status", "a", "b")) == (
        "requests r1: status: live='a' rebuilt='b'"
    )
    assert "live only" in str(replay.Difference("usage_daily", ("d", "t"), "(row)", "x", None))


def test_history_lines_describe_each_event_kind() -> None:
    plan = synthetic.RequestPlan("r", "t", "m", 2, 3, 19, "cancelled")
    kinds = [replay_cli.describe(p.event)[0] for p in synthetic.events_of(plan, "p", "t")]
    assert kinds[0] == "submitted" and "cancel_requested" in kinds and kinds[-1] == "completed"
    sub = synthetic.events_of(plan, "p", "t")[0].event
    assert "reserved=19" in replay_cli.describe(sub)[1]


def test_rebuild_refuses_filters() -> None:
    with pytest.raises(SystemExit):
        replay_cli.main(["--verify", "--request-id", "x"])


def test_lag_seconds_is_the_age_of_the_oldest_unprojected_record() -> None:
    from aggregator.metrics import LagSnapshot

    lag = LagSnapshot(
        events={("t", 0): 5, ("t", 1): 0, ("t", 2): 3},
        oldest_pending_ms={("t", 0): 10_000, ("t", 1): 1_000},
    )
    # Caught-up partitions are 0 whatever was seen before; unknown age counts as 0.
    assert lag.seconds(now_ms=12_500) == {("t", 0): 2.5, ("t", 1): 0.0, ("t", 2): 0.0}
