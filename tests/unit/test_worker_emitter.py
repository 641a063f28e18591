"""The Emitter (worker/emitter.py) against a fake producer: order, coalescing, timer flush, the
fence on every event, and nothing sent while the produce gate is closed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from llmstream import codec
from llmstream.fold import fold, fold_all
from llmstream.v1 import common_pb2, events_pb2
from worker.core import envelope_of
from worker.emitter import Emitter
from worker.lease import ProduceGate


class FakeProducer:
    """Acknowledges each record `ack_s` after it was sent."""

    def __init__(self, ack_s: float) -> None:
        self.ack_s = ack_s
        self.sent: list[tuple[str, bytes, int, bytes]] = []
        self.headers: list[list[tuple[str, bytes]]] = []

    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int, headers: Any
    ) -> asyncio.Future[None]:
        self.sent.append((topic, key, partition, value))
        self.headers.append(list(headers))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(self.ack_s, fut.set_result, None)
        return fut


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make(
    ack_s: float, coalesce_ms: float, gate: ProduceGate | None = None, compact: bool = False
) -> tuple[Emitter, FakeProducer]:
    producer = FakeProducer(ack_s)
    submit = codec.new_event("r1", "t1")
    submit.trace.traceparent = TRACEPARENT
    em = Emitter(
        producer,
        "toks",
        2,
        envelope_of(submit, "w", generation=7),
        gate=gate or ProduceGate(suspect_after_s=3600),
        coalesce_s=coalesce_ms / 1000,
        coalesce_bytes=1000,
        compact=compact,
    )
    return em, producer


@dataclass(frozen=True)
class Rec:
    key: bytes
    value: bytes
    timestamp: int


def decoded(producer: FakeProducer) -> list[events_pb2.Event]:
    """What a reader decodes from the sent records (timestamps: 1000 + position)."""
    assert all(t == "toks" and k == b"r1" and p == 2 for t, k, p, _ in producer.sent)
    return [
        codec.decode_record(Rec(k, v, 1000 + i)) for i, (_, k, _, v) in enumerate(producer.sent)
    ]


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


async def one_attempt(compact: bool) -> tuple[list[events_pb2.Event], FakeProducer]:
    em, producer = make(ack_s=0.0, coalesce_ms=0, compact=compact)
    await em.begin_attempt(1)
    await em.send(em.env.started("w", "m:1", "v1", 1, 0), gates=False)
    for i in range(5):
        await em.push(f"t{i} ", [i, 100 + i])
    await em.flush()
    usage = em.usage(prompt_tokens=3)
    await em.send(em.env.completed(common_pb2.FINISH_REASON_STOP, usage, None, em.last_seq))
    await em.settle()
    return decoded(producer), producer


async def test_compact_token_events_fold_like_full_ones() -> None:
    full, _ = await one_attempt(compact=False)
    compact, producer = await one_attempt(compact=True)
    kinds = [e.WhichOneof("body") for e in compact]
    assert kinds[0] == "started" and kinds[-1] == "completed" and len(kinds) > 2
    for i, (kind, headers) in enumerate(zip(kinds, producer.headers, strict=True)):
        bare = events_pb2.Event.FromString(producer.sent[i][3])
        if kind == "token_delta":
            assert headers == [("event-type", b"token_delta")]
            assert not bare.request_id and not bare.producer_id and not bare.HasField("trace")
            assert not bare.HasField("event_time") and bare.tenant_id == "t1"
            assert (bare.fence.generation, bare.fence.attempt) == (7, 1)
        else:  # started and the terminal event keep the whole envelope and headers
            assert bare.request_id == "r1" and bare.trace.traceparent == TRACEPARENT
            assert dict(headers)["content-type"] == codec.CONTENT_TYPE
    want, got = fold_all(full)["r1"], fold_all(compact)["r1"]
    assert got.text == want.text == "".join(f"t{i} " for i in range(5))
    assert got.token_ids == want.token_ids and got.last_seq == want.last_seq
    assert (got.status, got.completion_tokens, got.missing_seqs) == (want.status, 10, 0)
    assert got.tenant_id == "t1" and got.first_token_at_ms == 1001  # the record timestamp
    full_bytes = sum(len(v) for *_, v in (await one_attempt(compact=False))[1].sent[1:-1])
    compact_bytes = sum(len(v) for *_, v in producer.sent[1:-1])
    assert compact_bytes < full_bytes


async def test_unbounded_delay_flushes_on_acks_only_without_a_timer() -> None:
    em, producer = make(ack_s=0.01, coalesce_ms=float("inf"))
    for i in range(30):
        await em.push(f"t{i} ", [i])
        assert em._timer is None  # natural batching: nothing on the loop's timer heap
        await asyncio.sleep(0.001)
    await em.settle()  # the acknowledgements of what was sent; the last one flushes the tail
    await em.settle()  # ... in a flush task, which this waits for
    assert em.coalescer.empty
    events = decoded(producer)
    assert 1 < len(events) < 30  # merged while an event was in flight
    assert "".join(e.token_delta.text for e in events) == "".join(f"t{i} " for i in range(30))
    assert [t for e in events for t in e.token_delta.token_ids] == list(range(30))
    assert [e.token_delta.seq for e in events] == list(range(1, len(events) + 1))
