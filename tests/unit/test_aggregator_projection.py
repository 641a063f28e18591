"""The aggregator's pure core: batch folding, billing rules, row round trips, rollups."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random
from decimal import Decimal

from aggregator import projection
from aggregator.ledger import Price, PriceBook
from aggregator.projection import Coords, Stored
from llmstream import codec
from llmstream.fold import Status
from llmstream.v1 import common_pb2, events_pb2
from llmstream_tools.testing import synthetic_events as synthetic

P, T = "prompts", "tokens"


def ev(rid: str, tenant: str = "ten", at_ms: int = 1_700_000_000_000) -> events_pb2.Event:
    e = codec.new_event(rid, tenant, "test")
    e.event_time.FromMilliseconds(at_ms)
    return e


def submitted(rid: str, reserved: int = 30, tenant: str = "ten") -> events_pb2.Event:
    e = ev(rid, tenant)
    e.submitted.model = "m"
    e.submitted.reserved_tokens = reserved
    return e


def delta(rid: str, seq: int) -> events_pb2.Event:
    e = ev(rid)
    e.token_delta.seq = seq
    e.token_delta.text = f"<{seq}>"
    return e


def completed(rid: str, n: int, tenant: str = "ten") -> events_pb2.Event:
    e = ev(rid, tenant, at_ms=1_700_000_005_000)
    e.completed.finish_reason = common_pb2.FINISH_REASON_STOP
    e.completed.usage.prompt_tokens = 7
    e.completed.usage.completion_tokens = n
    e.completed.last_seq = n
    return e


def at(events: list[tuple[str, events_pb2.Event]]) -> list[tuple[Coords, events_pb2.Event]]:
    offsets: dict[str, int] = {}
    out = []
    for topic, e in events:
        offsets[topic] = offsets.get(topic, -1) + 1
        out.append((Coords(topic, 0, offsets[topic], 0), e))
    return out


def test_one_batch_bills_a_finished_request_once() -> None:
    stored: dict[str, Stored] = {}
    batch = at(
        [(P, submitted("r")), (T, delta("r", 1)), (T, delta("r", 2)), (T, completed("r", 2))]
    )
    result = projection.fold_batch(stored, batch)
    assert result.folded == 4 and not result.bad and not result.parked
    (bill,) = result.bills
    assert (bill.request_id, bill.tenant_id, bill.model, bill.status) == (
        "r",
        "ten",
        "m",
        "completed",
    )
    assert (bill.prompt_tokens, bill.completion_tokens, bill.used_tokens) == (7, 2, 9)
    assert bill.reserved_tokens == 30
    assert bill.billed_at_ms == 1_700_000_005_000 and bill.submitted_at_ms == 1_700_000_000_000
    assert bill.source == Coords(T, 0, 2, 0)
    # Redelivered terminal event in a later batch: never a second bill.
    again = projection.fold_batch(stored, at([(T, completed("r", 2))]))
    assert again.bills == [] and stored["r"].state.extra_terminals == 1


def test_terminal_before_submit_parks_then_bills_when_submit_arrives() -> None:
    stored: dict[str, Stored] = {}
    first = projection.fold_batch(stored, at([(T, delta("r", 1)), (T, completed("r", 1))]))
    assert first.bills == [] and [rid for _, rid in first.parked] == ["r"]
    assert stored["r"].state.terminal and not stored["r"].billed
    second = projection.fold_batch(stored, at([(P, submitted("r"))]))
    assert [b.request_id for b in second.bills] == ["r"] and not second.parked
    # The audit columns still point at the terminal record of the earlier batch.
    assert second.bills[0].source == Coords(T, 0, 1, 0)


def test_submit_in_the_same_batch_is_folded_first() -> None:
    stored: dict[str, Stored] = {}
    result = projection.fold_batch(
        stored, at([(T, delta("r", 1)), (T, completed("r", 1)), (P, submitted("r"))])
    )
    assert len(result.bills) == 1 and not result.parked


def test_events_without_or_with_foreign_tenant_are_bad_and_not_folded() -> None:
    stored: dict[str, Stored] = {}
    no_tenant = completed("r", 1, tenant="")
    foreign = completed("r", 500, tenant="intruder")
    result = projection.fold_batch(
        stored, at([(P, submitted("r")), (T, no_tenant), (T, foreign), (T, completed("r", 1))])
    )
    assert [b.reason for b in result.bad] == ["tenant_missing", "tenant_mismatch"]
    assert result.bills[0].completion_tokens == 1 and result.bills[0].tenant_id == "ten"


def test_row_round_trip_keeps_everything_the_fold_needs() -> None:
    stored: dict[str, Stored] = {}
    projection.fold_batch(stored, at([(P, submitted("r")), (T, delta("r", 1)), (T, delta("r", 2))]))
    row = projection.to_row(stored["r"], store_text=True)
    assert set(row) == set(projection.REQUEST_COLUMNS)
    back = projection.from_row(
        "r",
        json.loads(json.dumps(row["fold_state"])),
        row["text"],
        row["billed"],
        (row["terminal_topic"], row["terminal_partition"], row["terminal_offset"]),
    )
    assert projection.to_row(back, store_text=True) == row
    no_text = projection.to_row(stored["r"], store_text=False)
    assert no_text["text"] is None and "text" not in no_text["fold_state"]


def _persisted(stored: dict[str, Stored]) -> dict[str, Stored]:
    """What the next batch sees: rows written and read back."""
    out = {}
    for rid, entry in stored.items():
        row = projection.to_row(entry, store_text=True)
        out[rid] = projection.from_row(
            rid,
            json.loads(json.dumps(row["fold_state"])),
            row["text"],
            row["billed"],
            (row["terminal_topic"], row["terminal_partition"], row["terminal_offset"]),
        )
    return out


def test_batch_boundaries_do_not_change_rows_or_bills() -> None:
    # The live aggregator and a rebuild cut the log into different batches (and a crash cuts
    # it anywhere): rows and bills must be the same.
    plans = synthetic.plan(12, ["a", "b"], ["m"], seed=4)
    events = list(synthetic.interleaved(plans, P, T, seed=1, width=5))
    log = at([(p.topic, p.event) for p in events])

    def project(cuts: list[int]) -> tuple[dict[str, dict[str, object]], list[projection.Bill]]:
        stored: dict[str, Stored] = {}
        bills = []
        start = 0
        for end in [*cuts, len(log)]:
            result = projection.fold_batch(stored, log[start:end])
            bills += result.bills
            stored = _persisted(stored)
            start = end
        rows = {rid: projection.to_row(e, True) for rid, e in stored.items()}
        return rows, sorted(bills, key=lambda b: b.request_id)

    reference = project([])
    rng = random.Random(9)
    for _ in range(25):
        cuts = sorted(rng.sample(range(1, len(log)), rng.randint(1, 12)))
        assert project(cuts) == reference, cuts
    rows, bills = reference
    assert len(bills) == len(plans) and all(r["billed"] for r in rows.values())


def test_rollup_groups_by_utc_day_tenant_model() -> None:
    stored: dict[str, Stored] = {}
    batch = []
    for i, rid in enumerate(["r1", "r2", "r3"]):
        tenant = "t1" if i < 2 else "t2"
        batch += [(P, submitted(rid, tenant=tenant)), (T, completed(rid, i, tenant=tenant))]
    result = projection.fold_batch(stored, at(batch))
    book = PriceBook([Price("m", dt.datetime(2000, 1, 1, tzinfo=dt.UTC), Decimal(1), Decimal(2))])
    rows = projection.price(result.bills, book)
    deltas = projection.rollup(rows)
    day = dt.date(2023, 11, 14)
    assert set(deltas) == {(day, "t1", "m"), (day, "t2", "m")}
    t1 = deltas[(day, "t1", "m")]
    assert (t1.requests, t1.completed, t1.prompt_tokens, t1.completion_tokens) == (2, 2, 14, 1)
    assert t1.cost == Decimal("0.016")  # 14 * 1/1000 + 1 * 2/1000
    assert deltas[(day, "t2", "m")].unpriced == 0


def test_status_of_every_outcome_is_billed_with_its_status() -> None:
    plans = [
        synthetic.RequestPlan(f"r-{o}", "t", "m", n, 3, 20, o)
        for o, n in itertools.product(["stop", "length", "cancelled", "failed"], [0, 3])
    ]
    stored: dict[str, Stored] = {}
    events = [(p.topic, p.event) for plan in plans for p in synthetic.events_of(plan, P, T)]
    result = projection.fold_batch(stored, at(events))
    status = {b.request_id: b.status for b in result.bills}
    assert status == {
        p.request_id: {"stop": "completed", "length": "completed"}.get(p.outcome, p.outcome)
        for p in plans
    }
    assert all(
        stored[p.request_id].state.status in (Status.COMPLETED, Status.CANCELLED, Status.FAILED)
        for p in plans
    )


def test_time_conversions_are_exact() -> None:
    for ms in (0, 1, 1_700_000_000_123, 4_102_444_800_999):
        assert projection.dt_to_ms(projection.ms_to_dt(ms)) == ms
