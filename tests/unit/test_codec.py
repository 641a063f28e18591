"""Event codec: round trip, and a clear reason for every kind of bad record."""

from __future__ import annotations

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
