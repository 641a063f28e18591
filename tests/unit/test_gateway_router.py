"""Gateway routing: per-socket bounded outbox, watches folding events, catch-up merge."""

from __future__ import annotations

import json

from gateway.router import Outbox, Router, Watch
from llmstream import codec
from llmstream.v1 import common_pb2, events_pb2


def delta(rid: str, seq: int, text: str | None = None) -> events_pb2.Event:
    ev = codec.new_event(rid, "t")
    ev.token_delta.seq = seq
    ev.token_delta.text = text if text is not None else f"<{seq}>"
    return ev


def done(rid: str, last: int) -> events_pb2.Event:
    ev = codec.new_event(rid, "t")
    ev.completed.finish_reason = common_pb2.FINISH_REASON_STOP
    ev.completed.last_seq = last
    ev.completed.usage.completion_tokens = last
    return ev


def frames(box: Outbox) -> list[dict[str, object]]:
    return [json.loads(f) for f in box.frames if isinstance(f, str)]


def test_outbox_is_bounded_and_overflow_frees_memory() -> None:
    overflowed: list[bool] = []
    box = Outbox(3, on_overflow=lambda: overflowed.append(True))
    assert all(box.put(str(i)) for i in range(3))
    assert not box.put("x")
    assert box.overflowed and len(box) == 0 and box.high_water == 3 and overflowed == [True]
    assert not box.put("y") and overflowed == [True]


def test_watch_dedups_and_emits_done_once() -> None:
    box = Outbox(100)
    w = Watch("r", box, after_seq=0, submitted_at_ms=0, tenant_id="t")
    for ev in [delta("r", 1), delta("r", 2), delta("r", 2), delta("r", 1), delta("r", 3)]:
        w.apply(ev)
    w.apply(done("r", 3))
    w.apply(done("r", 3))
    out = frames(box)
    assert [f["seq"] for f in out if f["type"] == "token"] == [1, 2, 3]
    assert [f["type"] for f in out].count("done") == 1
    assert out[-1]["finish_reason"] == "stop" and w.finished
    assert w.state.text_parts == []  # a watch keeps no text


def test_watch_after_seq_skips_what_client_has() -> None:
    box = Outbox(100)
    w = Watch("r", box, after_seq=2, tenant_id="t")
    for s in range(1, 5):
        w.apply(delta("r", s))
    assert [f["seq"] for f in frames(box)] == [3, 4]


def test_catch_up_then_parked_live_events_without_gap_or_duplicate() -> None:
    box = Outbox(100)
    router = Router()
    w = Watch("r", box, after_seq=1, catching_up=True, tenant_id="t")
    router.add(w)
    # Live events 4..5 arrive while the replay (1..4) runs.
    router.deliver(delta("r", 4))
    router.deliver(delta("r", 5))
    assert len(box) == 0
    for s in range(1, 5):
        w.apply(delta("r", s))
    w.end_catch_up()
    router.deliver(delta("r", 6))
    router.deliver(done("r", 6))
    out = frames(box)
    assert [f["seq"] for f in out if f["type"] == "token"] == [2, 3, 4, 5, 6]
    assert out[-1]["type"] == "done"
    assert not router.watched("r")


def test_router_fans_out_to_several_sockets() -> None:
    a, b = Outbox(10), Outbox(10)
    router = Router()
    router.add(Watch("r", a, tenant_id="t"))
    router.add(Watch("r", b, tenant_id="t"))
    assert router.deliver(delta("r", 1)) == 2
    assert router.deliver(delta("other", 1)) == 0
    assert len(a) == len(b) == 1


def test_parked_events_beyond_bound_overflow_the_socket() -> None:
    box = Outbox(2)
    w = Watch("r", box, catching_up=True, tenant_id="t")
    for s in range(1, 5):
        w.on_live(delta("r", s))
    assert box.overflowed


def taken(box: Outbox) -> list[dict[str, object]]:
    """What a sender writes: every queued entry, each rendered as it is taken."""
    out = []
    while box.frames:
        out.append(json.loads(box.take()))
    return out


def test_v1_outbox_sends_one_frame_per_token() -> None:
    box = Outbox(100)
    w = Watch("r", box, tenant_id="t")
    for s in range(1, 6):
        w.apply(delta("r", s))
    out = taken(box)
    assert [(f["type"], f["seq"], f["text"]) for f in out] == [
        ("token", s, f"<{s}>") for s in range(1, 6)
    ]


def test_batching_outbox_merges_what_waits_into_one_tokens_frame() -> None:
    box = Outbox(100)
    box.batch_tokens = True
    w = Watch("r", box, tenant_id="t")
    for s in range(1, 5):
        w.apply(delta("r", s))
    assert len(box.frames) == 1 and len(box) == 4
    first = json.loads(box.take())
    assert first == {
        "type": "tokens",
        "request_id": "r",
        "seq": 4,
        "texts": ["<1>", "<2>", "<3>", "<4>"],
    }
    assert len(box) == 0
    # Taken: the next token starts a new frame (a lone one keeps the v1 shape), then done.
    w.apply(delta("r", 5))
    w.apply(delta("r", 5))  # redelivered: dropped
    w.apply(done("r", 5))
    out = taken(box)
    assert out[0] == {"type": "token", "request_id": "r", "seq": 5, "text": "<5>"}
    assert [f["type"] for f in out] == ["token", "done"] and out[1]["last_seq"] == 5


def test_batches_are_per_request_and_keep_seqs_exact() -> None:
    box = Outbox(100)
    box.batch_tokens = True
    a = Watch("a", box, tenant_id="t")
    b = Watch("b", box, after_seq=2, tenant_id="t")
    for s in range(1, 5):
        a.apply(delta("a", s))
        b.apply(delta("b", s))  # seqs 1, 2 are the client's already
    a.apply(delta("a", 7))  # a gap in the log: not implied by the batch's last seq
    out = taken(box)
    seqs: dict[str, list[int]] = {"a": [], "b": []}
    for f in out:
        last = int(f["seq"])  # type: ignore[call-overload]
        n = len(f["texts"]) if f["type"] == "tokens" else 1  # type: ignore[arg-type]
        seqs[str(f["request_id"])] += list(range(last - n + 1, last + 1))
    assert seqs == {"a": [1, 2, 3, 4, 7], "b": [3, 4]}
    assert [f["type"] for f in out] == ["tokens", "tokens", "token"]


def test_batched_tokens_count_towards_the_bound() -> None:
    overflowed: list[bool] = []
    box = Outbox(3, on_overflow=lambda: overflowed.append(True))
    box.batch_tokens = True
    w = Watch("r", box, tenant_id="t")
    for s in range(1, 4):
        w.apply(delta("r", s))
    assert len(box.frames) == 1 and len(box) == 3 and not box.overflowed
    w.apply(delta("r", 4))
    assert box.overflowed and overflowed == [True] and len(box) == 0 and not box.frames
