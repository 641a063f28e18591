"""Event codec: round trip, and a clear reason for every kind of bad record."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llmstream import codec
from llmstream.v1 import events_pb2


def sample() -> events_pb2.Event:
    event = codec.new_event("r1", "t1", "gw-0")
    event.token_delta.seq = 1
    event.token_delta.text = 'quote " newline \n emoji 🙂 nul \x00'
    event.trace.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    return event


def test_round_trip_keeps_every_field() -> None:
    event = sample()
    assert codec.decode(codec.encode(event)) == event
    assert codec.key(event) == b"r1"


def test_headers_carry_type_and_trace() -> None:
    hdrs = dict(codec.headers(sample()))
    assert hdrs["event-type"] == b"token_delta"
    assert hdrs["traceparent"].startswith(b"00-0af7")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "tombstone"),
        (b"\xff\xff\xff garbage", "not a protobuf"),
        (events_pb2.Event(request_id="r").SerializeToString(), "schema_version missing"),
        (events_pb2.Event(schema_version=99, request_id="r").SerializeToString(), "newer"),
        (events_pb2.Event(schema_version=1).SerializeToString(), "request_id"),
        (events_pb2.Event(schema_version=1, request_id="r").SerializeToString(), "body"),
    ],
)
def test_bad_records_are_refused_with_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(codec.DecodeError, match=reason):
        codec.decode(value)


def test_encode_refuses_incomplete_events() -> None:
    with pytest.raises(ValueError, match="body"):
        codec.encode(codec.new_event("r", "t"))


# -- token events: no content-type; the compact shape takes id and time from the record -------


@dataclass(frozen=True)
class Rec:
    key: bytes | None
    value: bytes | None
    timestamp: int


def attempt_envelope() -> events_pb2.Event:
    """What a worker's attempt stamps on its events (worker.core.Envelope.event)."""
    ev = codec.new_event("req_1", "t_9", "worker-3")
    ev.trace.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ev.fence.generation, ev.fence.attempt = 4, 2
    return ev


def test_token_events_have_no_content_type_header_other_events_do() -> None:
    assert [k for k, _ in codec.headers(sample())] == ["event-type", "traceparent"]
    started = codec.new_event("r", "t")
    started.started.attempt = 1
    assert dict(codec.headers(started))["content-type"] == codec.CONTENT_TYPE


def test_full_token_event_decodes_alone_like_the_whole_event() -> None:
    enc = codec.TokenDeltaEncoder(attempt_envelope(), compact=False)
    got = codec.decode(enc.value(5, "héllo", [1, 2, 300]))
    want = attempt_envelope()
    want.token_delta.seq, want.token_delta.text = 5, "héllo"
    want.token_delta.token_ids.extend([1, 2, 300])
    want.event_time.CopyFrom(got.event_time)
    assert got == want
    assert dict(enc.headers) == {
        "event-type": b"token_delta",
        "traceparent": want.trace.traceparent.encode(),
    }


def test_compact_token_event_carries_tenant_fence_body_only() -> None:
    enc = codec.TokenDeltaEncoder(attempt_envelope(), compact=True)
    value = enc.value(5, "héllo", [1, 2, 300])
    bare = events_pb2.Event.FromString(value)
    assert bare.schema_version == codec.SCHEMA_VERSION and bare.tenant_id == "t_9"
    assert (bare.fence.generation, bare.fence.attempt) == (4, 2)
    assert not bare.request_id and not bare.producer_id
    assert not bare.HasField("event_time") and not bare.HasField("trace")
    assert enc.headers == [("event-type", b"token_delta")]
    with pytest.raises(codec.DecodeError, match="request_id missing"):
        codec.decode(value)  # a reader that does not pass the record key cannot use it
    ev = codec.decode_record(Rec(b"req_1", value, 1_796_680_800_123))
    assert ev.request_id == "req_1" and ev.tenant_id == "t_9"
    assert ev.event_time.ToMilliseconds() == 1_796_680_800_123
    assert (ev.token_delta.seq, ev.token_delta.text) == (5, "héllo")
    assert list(ev.token_delta.token_ids) == [1, 2, 300]
    assert len(value) < len(
        codec.TokenDeltaEncoder(attempt_envelope(), compact=False).value(5, "héllo", [1, 2, 300])
    )


def test_the_record_never_overrides_what_the_value_carries() -> None:
    event = sample()
    ev = codec.decode_record(Rec(b"other", codec.encode(event), 5))
    assert ev == event  # old-format events (replay of topics written before) decode as they were


@pytest.mark.parametrize(
    ("key", "timestamp", "reason"),
    [(None, 5, "request_id missing"), (b"", 5, "request_id missing"), (b"\xff\xfe", 5, "UTF-8")],
)
def test_a_compact_event_without_a_usable_key_is_refused(
    key: bytes | None, timestamp: int, reason: str
) -> None:
    value = codec.TokenDeltaEncoder(attempt_envelope(), compact=True).value(1, "x", [1])
    with pytest.raises(codec.DecodeError, match=reason):
        codec.decode_record(Rec(key, value, timestamp))


def test_no_record_timestamp_leaves_event_time_unset() -> None:
    value = codec.TokenDeltaEncoder(attempt_envelope(), compact=True).value(1, "x", [1])
    assert not codec.decode_record(Rec(b"req_1", value, -1)).HasField("event_time")
