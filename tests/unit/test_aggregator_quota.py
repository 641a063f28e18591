"""Quota key layout (shared with the gateway), the settlement script's arguments, the reaper's
choice and the billing policy of requests that never started."""

from __future__ import annotations

import datetime as dt

import pytest

from aggregator.projection import Stored, bill_for
from aggregator.quota_settlement import settle_args
from aggregator.reservation_reaper import Reservation, reap_keys, to_reap
from aggregator.store import Settlement
from llmstream import codec, quota_keys
from llmstream.fold import RequestState, fold
from llmstream.v1 import common_pb2, events_pb2


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    t = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def test_keys_share_the_tenant_hash_tag_and_utc_windows() -> None:
    at = ms(2026, 12, 31, 23, 59, 59)
    assert quota_keys.tokens_day("t1", at) == "quota:{t1}:tokens:day:20261231"
    assert quota_keys.tokens_month("t1", at) == "quota:{t1}:tokens:month:202612"
    assert quota_keys.requests_minute("t1", at) == "quota:{t1}:requests:minute:202612312359"
    assert quota_keys.streams("t1") == "quota:{t1}:streams"
    assert quota_keys.settled("t1", at) == "quota:{t1}:settled:20261231"
    assert quota_keys.reservations("t1") == "quota:{t1}:reservations"
    assert quota_keys.reserved("t1") == "quota:{t1}:reserved"


def test_reaper_takes_only_reservations_whose_request_never_reached_the_log() -> None:
    old = [Reservation("t1", "r1", 1), Reservation("t1", "r2", 2), Reservation("t2", "r3", 3)]
    assert to_reap(old, in_log={"r2"}) == [old[0], old[2]]
    assert reap_keys(old[2]) == [
        "quota:{t2}:streams",
        "quota:{t2}:tokens:day:19700101",
        "quota:{t2}:tokens:month:197001",
        "quota:{t2}:reservations",
        "quota:{t2}:reserved",
    ]


def test_window_bounds_roll_over_months_and_years() -> None:
    at = ms(2026, 12, 31, 12)
    assert quota_keys.day_start_ms(at) == ms(2026, 12, 31)
    assert quota_keys.day_end_ms(at) == ms(2027, 1, 1)
    assert quota_keys.month_start_ms(at) == ms(2026, 12, 1)
    assert quota_keys.month_end_ms(at) == ms(2027, 1, 1)
    assert quota_keys.month_end_ms(ms(2028, 2, 29)) == ms(2028, 3, 1)
    assert quota_keys.expire_day_at_ms(at) == ms(2027, 1, 2)
    assert quota_keys.minute_start_ms(ms(2026, 1, 1, 0, 0, 59)) == ms(2026, 1, 1)


def test_unusable_tenant_ids_are_refused() -> None:
    for bad in ("", "a{b", "x}"):
        with pytest.raises(ValueError):
            quota_keys.tokens_day(bad, 0)


def test_settlement_targets_the_windows_of_the_submit_time() -> None:
    submitted = ms(2026, 3, 31, 23, 59)  # finished after midnight: still March's windows
    keys, args = settle_args(Settlement("r1", "t1", submitted, reserved_tokens=100, used_tokens=37))
    assert keys == [
        "quota:{t1}:settled:20260331",
        "quota:{t1}:tokens:day:20260331",
        "quota:{t1}:tokens:month:202603",
        "quota:{t1}:streams",
        "quota:{t1}:reservations",
        "quota:{t1}:reserved",
    ]
    # The usage: the reservation taken back is the one the gateway recorded (in Redis), never
    # the event's reserved_tokens.
    assert args[:2] == ["r1", 37]
    assert args[2] == ms(2026, 4, 2) and args[3] == ms(2026, 4, 2)


def _event(rid: str, kind: str) -> events_pb2.Event:
    e = codec.new_event(rid, "t1", "test")
    e.event_time.FromMilliseconds(1_700_000_000_000)
    if kind == "submitted":
        e.submitted.model = "m"
        e.submitted.reserved_tokens = 40
    elif kind == "started":
        e.started.attempt = 1
    elif kind == "failed":
        e.failed.code = "model_unavailable"
        e.failed.usage.prompt_tokens = 7  # the gateway's estimate
    elif kind == "cancelled":
        e.completed.finish_reason = common_pb2.FINISH_REASON_CANCELLED
        e.completed.usage.prompt_tokens = 7
    elif kind == "stop":
        e.completed.finish_reason = common_pb2.FINISH_REASON_STOP
        e.completed.usage.prompt_tokens = 7
    return e


def test_billing_policy_requests_that_never_started_owe_nothing() -> None:
    def bill(*kinds: str) -> tuple[int, int] | None:
        state = RequestState(request_id="r")
        for kind in kinds:
            fold(state, _event("r", kind))
        b = bill_for(Stored(state))
        return None if b is None else (b.prompt_tokens, b.used_tokens)

    # Failed or cancelled before any model server streamed it: billed 0, reservation freed.
    assert bill("submitted", "failed") == (0, 0)
    assert bill("submitted", "cancelled") == (0, 0)
    # Once started, the reported usage is billed whatever the outcome; a completion always.
    assert bill("submitted", "started", "failed") == (7, 7)
    assert bill("submitted", "started", "cancelled") == (7, 7)
    assert bill("submitted", "stop") == (7, 7)
