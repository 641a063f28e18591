"""Slot scheduler: bounded slots, priority then FIFO, aging, cancellation without leaks."""

from __future__ import annotations

import asyncio

import pytest

from model_server.scheduler import SlotScheduler


async def test_slots_are_granted_immediately_while_free() -> None:
    s = SlotScheduler(2)
    a = await s.acquire()
    b = await s.acquire()
    assert {a, b} == {0, 1}
    assert s.running == 2 and s.waiting == 0


async def test_waiters_are_served_by_priority_then_arrival() -> None:
    s = SlotScheduler(1)
    slot = await s.acquire()
    order: list[str] = []

    async def wait(name: str, prio: int) -> None:
        got = await s.acquire(prio)
        order.append(name)
        s.release(got)

    tasks = [
        asyncio.create_task(wait(name, prio))
        for name, prio in [("low1", 0), ("high", 5), ("low2", 0), ("mid", 1)]
    ]
    await asyncio.sleep(0)
    assert s.waiting == 4
    s.release(slot)
    await asyncio.gather(*tasks)
    assert order == ["high", "mid", "low1", "low2"]
    assert s.running == 0 and s.waiting == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    s = SlotScheduler(1)
    slot = await s.acquire()
    waiter = asyncio.create_task(s.acquire())
    await asyncio.sleep(0)
    assert s.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert s.waiting == 0
    s.release(slot)
    assert s.running == 0
    assert await s.acquire() == slot


async def test_slot_granted_to_a_cancelled_waiter_is_passed_on() -> None:
    s = SlotScheduler(1)
    slot = await s.acquire()
    first = asyncio.create_task(s.acquire())
    second = asyncio.create_task(s.acquire())
    await asyncio.sleep(0)
    s.release(slot)  # granted to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1) == slot
    assert s.running == 1 and s.waiting == 0


async def test_many_cancelled_waiters_leave_nothing_behind() -> None:
    s = SlotScheduler(1)
    await s.acquire()
    for _ in range(200):
        t = asyncio.create_task(s.acquire())
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    assert s.waiting == 0
    assert s._classes == {}


async def test_release_skips_a_waiter_cancelled_before_it_left() -> None:
    s = SlotScheduler(1)
    slot = await s.acquire()
    first = asyncio.create_task(s.acquire())
    second = asyncio.create_task(s.acquire())
    await asyncio.sleep(0)
    first.cancel()  # its future is cancelled now; the task leaves the queue when it runs
    s.release(slot)
    assert await asyncio.wait_for(second, 1) == slot
    with pytest.raises(asyncio.CancelledError):
        await first
    assert s.running == 1 and s.waiting == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def granted(s: SlotScheduler, order: list[str], name: str, prio: int) -> int:
    slot = await s.acquire(prio)
    order.append(name)
    return slot


async def test_aging_lifts_a_batch_waiter_to_the_top_class() -> None:
    clock = FakeClock()
    s = SlotScheduler(1, aging_s=10, clock=clock)
    slot = await s.acquire()
    order: list[str] = []
    batch = asyncio.create_task(granted(s, order, "batch", -1))
    await asyncio.sleep(0)
    clock.now = 15.0  # one aging period: batch is class 0, still below interactive
    chat1 = asyncio.create_task(granted(s, order, "chat1", 1))
    chat2 = asyncio.create_task(granted(s, order, "chat2", 1))
    await asyncio.sleep(0)
    s.release(slot)
    slot = await chat1
    clock.now = 25.0  # two periods: batch reaches the top class and is the oldest there
    s.release(slot)
    slot = await batch
    s.release(slot)
    await chat2
    assert order == ["chat1", "batch", "chat2"]


async def test_a_long_waiting_standard_sequence_goes_before_a_new_interactive_one() -> None:
    clock = FakeClock()
    s = SlotScheduler(1, aging_s=1, clock=clock)
    slot = await s.acquire()
    order: list[str] = []
    old = asyncio.create_task(granted(s, order, "old-standard", 0))
    await asyncio.sleep(0)
    clock.now = 100.0
    chat = asyncio.create_task(granted(s, order, "chat", 1))
    await asyncio.sleep(0)
    s.release(slot)
    s.release(await old)
    await chat
    # Aged to the interactive class (capped there), the standard waiter is the oldest in it.
    assert order == ["old-standard", "chat"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="slots"):
        SlotScheduler(0)
    with pytest.raises(ValueError, match="aging_s"):
        SlotScheduler(1, aging_s=0)
