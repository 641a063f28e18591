"""Slot scheduler: bounded slots, priority then FIFO, cancellation without leaks."""

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


async def test_stale_entries_are_compacted() -> None:
    s = SlotScheduler(1)
    await s.acquire()
    for _ in range(200):
        t = asyncio.create_task(s.acquire())
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    assert s.waiting == 0
    assert len(s._heap) < 40
