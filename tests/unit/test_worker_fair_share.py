"""The fair-share policy (worker.fair_share) and the read-ahead window (worker.read_ahead)."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from llmstream import codec
from llmstream.fold import RequestState
from worker.fair_share import PREFILL_DISCOUNT, UNSET_MAX_TOKENS_COST, FairQueue, request_cost
from worker.read_ahead import ReadAhead
from worker.run import Run


def drain(q: FairQueue[str], now: float = 0.0) -> list[str]:
    out = []
    while (entry := q.pop(now)) is not None:
        out.append(entry.item)
    return out


def add(
    q: FairQueue[str],
    item: str,
    tenant: str,
    *,
    cost: float = 10,
    weight: float = 1,
    priority: int = 0,
    now: float = 0.0,
) -> None:
    q.add(item, tenant=tenant, priority=priority, cost=cost, weight=weight, now=now)


def test_a_quiet_tenant_is_not_queued_behind_a_burst() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    for i in range(100):
        add(q, f"a{i}", "A")
    add(q, "b0", "B")
    order = drain(q)
    # A's oldest goes first (ties go to the older request), then B: not after A's 100.
    assert order[:3] == ["a0", "b0", "a1"]
    assert [x for x in order if x.startswith("a")] == [f"a{i}" for i in range(100)]


def test_tenants_alternate_by_token_cost() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    for i in range(4):
        add(q, f"big{i}", "A", cost=100)
    for i in range(8):
        add(q, f"small{i}", "B", cost=50)
    order = drain(q)
    # Each big request of A weighs two of B's: B gets two starts per A start.
    assert order == [
        "big0", "small0", "small1", "big1", "small2", "small3",
        "big2", "small4", "small5", "big3", "small6", "small7",
    ]  # fmt: skip


def test_weights_share_the_starts() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    for i in range(30):
        add(q, f"gold{i}", "gold", weight=3)
        add(q, f"free{i}", "free", weight=1)
    first = [q.pop(0.0) for _ in range(20)]
    gold = sum(1 for e in first if e is not None and e.tenant == "gold")
    assert gold == 15  # 3 : 1


def test_work_conserving_a_tenant_alone_gets_everything_in_log_order() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    for i in range(50):
        add(q, f"a{i}", "A", cost=1000)
    assert drain(q) == [f"a{i}" for i in range(50)]
    assert q.pop(0.0) is None and len(q) == 0


def test_an_idle_tenant_banks_no_credit() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    # A is served alone for a while: 20 starts.
    for i in range(20):
        add(q, f"a{i}", "A")
    assert len(drain(q)) == 20
    # B was idle all along; now both burst. B must not get 20 starts in a row.
    for i in range(10):
        add(q, f"a-late{i}", "A")
        add(q, f"b{i}", "B")
    order = drain(q)
    assert order[:4] in (["a-late0", "b0", "a-late1", "b1"], ["b0", "a-late0", "b1", "a-late1"])


def test_settle_refunds_what_was_not_generated() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    add(q, "a0", "A", cost=100)
    entry = q.pop(0.0)
    assert entry is not None and q.counter("A") == 100
    q.settle("A", charged=100, used=7, weight=1)
    assert q.counter("A") == 7


def test_higher_class_first() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    for i in range(5):
        add(q, f"batch{i}", "A", priority=-1)
    add(q, "chat", "A", priority=1)
    add(q, "std", "B", priority=0)
    assert drain(q)[:2] == ["chat", "std"]


def test_aging_lifts_a_waiting_batch_request_to_the_top_class() -> None:
    q: FairQueue[str] = FairQueue(aging_s=10)
    add(q, "batch", "A", priority=-1, now=0.0)
    for i in range(5):
        add(q, f"chat{i}", "B", priority=1, now=15.0)
    # At t=15 the batch request has aged one class (-1 -> 0): still behind the interactive ones.
    first = q.pop(15.0)
    assert first is not None and first.item == "chat0"
    # At t=25 it has aged two classes: in line with the top class, and fair share (A has had
    # nothing, B one start) puts it first.
    second = q.pop(25.0)
    assert second is not None and second.item == "batch"


def test_aging_never_ranks_a_burst_above_the_top_class() -> None:
    q: FairQueue[str] = FairQueue(aging_s=1)
    for i in range(10):
        add(q, f"a{i}", "A", now=0.0)
    first = q.pop(100.0)
    add(q, "b0", "B", now=100.0)
    # A's requests waited 100 aging periods but stay in class 0, like B's fresh request: fair
    # share decides: B arrives lifted to A's counter (no credit for its idle time), the tie goes
    # to the older request, then B, not after A's nine.
    assert first is not None and first.item == "a0"
    assert drain(q, 100.0)[:3] == ["a1", "b0", "a2"]


def test_remove_takes_out_matching_items() -> None:
    q: FairQueue[str] = FairQueue(aging_s=30)
    for i in range(6):
        add(q, f"a{i}", "A", priority=i % 2)
    removed = q.remove(lambda item: item in {"a1", "a2", "a5"})
    assert sorted(removed) == ["a1", "a2", "a5"]
    assert len(q) == 3
    assert drain(q) == ["a3", "a0", "a4"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="aging_s"):
        FairQueue(aging_s=0)
    q: FairQueue[str] = FairQueue(aging_s=1)
    with pytest.raises(ValueError, match="weight"):
        add(q, "x", "A", weight=0)


def test_request_cost() -> None:
    assert request_cost(100, 0) == 100
    assert request_cost(0, 0) == UNSET_MAX_TOKENS_COST  # max_tokens unset: a typical length
    assert request_cost(100, 8 * PREFILL_DISCOUNT) == 108
    assert request_cost(0, 0, unset_cost=0) == 1  # never free


# ------------------------------------------------------------------ the read-ahead window


def run_of(rid: str, tenant: str, offset: int, max_tokens: int = 10, priority: int = 0) -> Run:
    ev = codec.new_event(rid, tenant, "test")
    ev.submitted.max_tokens = max_tokens
    ev.submitted.priority = priority
    return Run(TopicPartition("p", 0), offset, 0, ev, needs_lookup=False)


def test_window_bounds_by_count_and_bytes() -> None:
    window = ReadAhead(capacity=3, max_bytes=1000, aging_s=30)
    assert window.fetch_bound(max_inflight=4) == 7
    window.add(run_of("r0", "A", 0), 100, 0.0)
    window.add(run_of("r1", "A", 1), 100, 0.0)
    assert not window.full
    window.add(run_of("r2", "A", 2), 100, 0.0)
    assert window.full and window.bytes == 300
    small = ReadAhead(capacity=100, max_bytes=250, aging_s=30)
    small.add(run_of("r0", "A", 0), 200, 0.0)
    assert not small.full and small.fetch_bound(4) == 104
    small.add(run_of("r1", "A", 1), 200, 0.0)
    # Over the byte bound: nothing more is fetched until runs leave the window.
    assert small.full and small.fetch_bound(4) == 4 + 2
    assert [r.request_id for r in small.take(1, 0.0, lambda r: True)] == ["r0"]
    assert small.bytes == 200 and not small.full


def test_window_starts_fairly_and_skips_dead_runs() -> None:
    window = ReadAhead(capacity=100, max_bytes=1 << 20, aging_s=30)
    for i in range(5):
        window.add(run_of(f"a{i}", "A", i), 10, 0.0)
    window.add(run_of("b0", "B", 5), 10, 0.0)
    dead = {"a0"}
    started = window.take(3, 0.0, lambda r: r.request_id not in dead)
    assert [r.request_id for r in started] == ["a1", "b0", "a2"]  # a0 dead: A owes nothing
    assert len(window) == 2 and window.bytes == 20
    assert window._queue.counter("A") == 2 * 10  # a0 never ran: not charged


def test_continuing_runs_skip_the_line() -> None:
    window = ReadAhead(capacity=100, max_bytes=1 << 20, aging_s=30)
    for i in range(3):
        window.add(run_of(f"a{i}", "A", i), 10, 0.0)
    resumed = run_of("taken-over", "A", 3)
    resumed.prior = RequestState(request_id="taken-over", attempts=1, last_seq=4)
    window.add(resumed, 10, 0.0)
    assert [r.request_id for r in window.take(2, 0.0, lambda r: True)] == ["taken-over", "a0"]


def test_window_forgets_revoked_runs() -> None:
    window = ReadAhead(capacity=100, max_bytes=1 << 20, aging_s=30)
    for i in range(4):
        window.add(run_of(f"a{i}", "A", i), 10, 0.0)
    window.forget(lambda r: r.offset % 2 == 0)
    assert len(window) == 2 and window.bytes == 20
    assert [r.request_id for r in window.take(5, 0.0, lambda r: True)] == ["a1", "a3"]


def test_ended_run_is_charged_what_it_generated() -> None:
    window = ReadAhead(capacity=10, max_bytes=1 << 20, aging_s=30)
    a0, a1 = run_of("a0", "A", 0, max_tokens=100), run_of("a1", "A", 1, max_tokens=100)
    b = [run_of(f"b{i}", "B", 2 + i, max_tokens=100) for i in range(3)]
    for r in (a0, a1, *b):
        window.add(r, 10, 0.0)
    assert [r.request_id for r in window.take(2, 0.0, lambda r: True)] == ["a0", "b0"]
    # a0 stopped after 1 token, b0 used all 100: A is now far behind B, so A gets the slot
    # (and B, below its share of the one slot, the overdraft).
    window.ended(a0, 1)
    window.ended(b[0], 100)
    assert [r.request_id for r in window.take(1, 0.0, lambda r: True)] == ["a1", "b1"]


def test_overdraft_starts_a_tenant_below_its_share_beyond_full_slots() -> None:
    window = ReadAhead(capacity=100, max_bytes=1 << 20, aging_s=30)
    for i in range(10):
        window.add(run_of(f"a{i}", "A", i), 10, 0.0)
    alive = lambda r: True  # noqa: E731
    assert len(window.take(4, 0.0, alive)) == 4  # A alone: every slot, no overdraft
    assert window.take(4, 0.0, alive) == []
    b0 = run_of("b0", "B", 10)
    window.add(b0, 10, 0.0)
    # Every slot is A's; B runs nothing (its share: 2 of 4): it starts in the overdraft (1 of
    # 4 slots / 16, at least 1).
    assert window.take(4, 0.0, alive) == [b0]
    window.add(run_of("b1", "B", 11), 10, 0.0)
    window.add(run_of("c0", "C", 12), 10, 0.0)
    # C is below its share too, but the overdraft is used up.
    assert window.take(4, 0.0, alive) == []
    assert window.running == 5
    window.ended(b0, 10)
    assert [r.request_id for r in window.take(4, 0.0, alive)] == ["c0"]


def test_overdraft_follows_the_weighted_share() -> None:
    window = ReadAhead(capacity=100, max_bytes=1 << 20, aging_s=30)
    alive = lambda r: True  # noqa: E731
    for i in range(40):
        window.add(run_of(f"a{i}", "A", i), 10, 0.0)
    assert len(window.take(32, 0.0, alive)) == 32
    # B (weight 1 of 2) may run up to 16 of the 32 slots; the overdraft is 2 (32 / 16).
    for i in range(3):
        window.add(run_of(f"b{i}", "B", 100 + i), 10, 0.0)
    assert [r.request_id for r in window.take(32, 0.0, alive)] == ["b0", "b1"]
    assert window.running == 34
    # As A's runs end, overdraft room frees and B, still below its share, takes it; A's own
    # starts wait until fewer than 32 run.
    started = []
    for _ in range(3):
        window.ended(run_of("a-any", "A", 0), 10)
        started += [r.request_id for r in window.take(32, 0.0, alive)]
    assert started == ["b2"]
