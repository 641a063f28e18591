"""The Emitter (worker/emitter.py) against a fake producer: order, coalescing, timer flush, the
fence on every event, and nothing sent while the produce gate is closed."""

from __future__ import annotations

import asyncio
from typing import Any

from llmstream import codec
from llmstream.fold import fold
from llmstream.v1 import events_pb2
from worker.core import envelope_of
from worker.emitter import Emitter
from worker.lease import ProduceGate


class FakeProducer:
    """Acknowledges each record `ack_s` after it was sent."""

    def __init__(self, ack_s: float) -> None:
        self.ack_s = ack_s
        self.sent: list[tuple[str, bytes, int, bytes]] = []

    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int, headers: Any
    ) -> asyncio.Future[None]:
        self.sent.append((topic, key, partition, value))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(self.ack_s, fut.set_result, None)
        return fut


def make(
    ack_s: float, coalesce_ms: float, gate: ProduceGate | None = None
) -> tuple[Emitter, FakeProducer]:
    producer = FakeProducer(ack_s)
    submit = codec.new_event("r1", "t1")
    em = Emitter(
        producer,
        "toks",
        2,
        envelope_of(submit, "w", generation=7),
        gate=gate or ProduceGate(suspect_after_s=3600),
        coalesce_s=coalesce_ms / 1000,
        coalesce_bytes=1000,
    )
    return em, producer


def decoded(producer: FakeProducer) -> list[events_pb2.Event]:
    assert all(t == "toks" and k == b"r1" and p == 2 for t, k, p, _ in producer.sent)
    return [codec.decode(v) for *_, v in producer.sent]


async def test_slow_acks_merge_deltas_in_order_and_timer_flushes_the_tail() -> None:
    em, producer = make(ack_s=0.02, coalesce_ms=5)
    for i in range(50):
        await em.push(f"t{i} ", [i])
        if i % 10 == 0:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.03)  # no more deltas: the timer / ack flushes what is buffered
    assert em.coalescer.empty
    await em.settle()
    events = decoded(producer)
    assert 1 < len(events) < 50
    state = None
    for ev in events:
        state = fold(state, ev)
    assert state is not None
    assert state.text == "".join(f"t{i} " for i in range(50))
    assert state.token_ids == list(range(50)) == em.token_ids
    assert [e.token_delta.seq for e in events] == list(range(1, len(events) + 1))
    assert em.last_seq == len(events)


async def test_fast_acks_send_every_delta_at_once() -> None:
    em, producer = make(ack_s=0.0, coalesce_ms=5)
    for i in range(5):
        await em.push("x", [i])
        await asyncio.sleep(0.002)  # the previous event is acknowledged meanwhile
    assert len(producer.sent) == 5
    await em.settle()
    em.close()


async def test_the_first_delta_does_not_wait_for_the_started_ack() -> None:
    em, producer = make(ack_s=10.0, coalesce_ms=1000)  # acks and the timer: far away
    await em.send(em.env.started("w", "m:1", "v1", 1, 0), gates=False)
    await em.push("first", [1])
    await em.push("second", [2])  # the first delta is not acknowledged: this one waits
    kinds = [e.WhichOneof("body") for e in decoded(producer)]
    assert kinds == ["started", "token_delta"]
    assert decoded(producer)[1].token_delta.text == "first"
    assert not em.coalescer.empty
    em.close()


async def test_every_event_carries_the_fence_of_its_attempt() -> None:
    em, producer = make(ack_s=0.0, coalesce_ms=0)
    await em.begin_attempt(1)
    await em.send(em.env.started("w", "m:1", "v1", 1, 0), gates=False)
    await em.push("a", [1])
    await em.push("b", [2])  # buffered behind the unacknowledged "a"
    await em.begin_attempt(2)  # a retry: what was buffered leaves with attempt 1
    await em.send(em.env.started("w", "m:2", "v1", 2, em.last_seq), gates=False)
    await em.push("c", [3])
    await em.flush()
    await em.settle()
    fences = [
        (e.WhichOneof("body"), e.fence.generation, e.fence.attempt) for e in decoded(producer)
    ]
    assert fences == [
        ("started", 7, 1),
        ("token_delta", 7, 1),
        ("token_delta", 7, 1),
        ("started", 7, 2),
        ("token_delta", 7, 2),
    ]


async def test_nothing_is_sent_while_the_gate_is_closed() -> None:
    gate = ProduceGate(suspect_after_s=3600)
    em, producer = make(ack_s=0.0, coalesce_ms=0, gate=gate)
    await em.push("a", [1])
    gate.lose()
    pushing = asyncio.create_task(em.push("b", [2]))
    for _ in range(10):  # let it run until it waits at the gate
        await asyncio.sleep(0)
    assert len(producer.sent) == 1 and not pushing.done()
    gate.confirm()
    await pushing
    assert [e.token_delta.text for e in decoded(producer)] == ["a", "b"]
