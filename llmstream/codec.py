"""Kafka record codec: protobuf `Event` envelopes, keys and headers.

Every llmstream topic carries `llmstream.v1.Event` values keyed by request id. A record that
cannot be decoded, or whose schema version is newer than this code knows, raises
`DecodeError` with a reason suitable for a dead-letter header.

Token events are the one event per few tokens, so their record carries only what the record
itself does not (docs/events.md, "Token events"): no content-type header, and in their
compact shape (`TokenDeltaEncoder(compact=True)`) no request id (the record key), event time
(the record timestamp), producer id or trace context (`started` and the terminal event carry
those). `decode_record` puts the request id and event time back from the record, so every
reader folds the same state from either shape; `decode(value)` alone needs them in the value.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from google.protobuf.message import DecodeError as _ProtobufDecodeError

from llmstream.v1 import events_pb2

SCHEMA_VERSION = 1
CONTENT_TYPE = b"application/x-protobuf; messageType=llmstream.v1.Event"

Headers = Sequence[tuple[str, bytes]]


class DecodeError(ValueError):
    """A record is not a usable Event; `str(exc)` is the reason (goes into DLQ headers)."""


def new_event(request_id: str, tenant_id: str, producer_id: str = "") -> events_pb2.Event:
    """An envelope stamped with the current schema version and wall-clock time."""
    event = events_pb2.Event(
        schema_version=SCHEMA_VERSION,
        request_id=request_id,
        tenant_id=tenant_id,
        producer_id=producer_id,
    )
    event.event_time.FromNanoseconds(time.time_ns())
    return event


def encode(event: events_pb2.Event) -> bytes:
    if not event.request_id:
        raise ValueError("event has no request_id")
    if event.WhichOneof("body") is None:
        raise ValueError("event has no body")
    return event.SerializeToString()


def key(event: events_pb2.Event) -> bytes:
    return event.request_id.encode()


def headers(event: events_pb2.Event) -> list[tuple[str, bytes]]:
    """Record headers: content type (not on token events: one schema per topic, and 66 bytes
    on each would outweigh the tokens), body kind (lets tools filter without decoding) and
    the W3C trace context when the event carries one (so tracing works even for consumers
    that don't decode)."""
    body = event.WhichOneof("body") or ""
    out = [] if body == "token_delta" else [("content-type", CONTENT_TYPE)]
    out.append(("event-type", body.encode()))
    if event.trace.traceparent:
        out.append(("traceparent", event.trace.traceparent.encode()))
        if event.trace.tracestate:
            out.append(("tracestate", event.trace.tracestate.encode()))
    return out


class TokenDeltaEncoder:
    """Record value and headers of one attempt's `token_delta` events (the hot path).

    `template` is the attempt's envelope (request and tenant ids, producer, trace, fence).
    The fields that never change within an attempt are serialized once; each delta appends
    its body (protobuf parses concatenated encodings as one merged message, so the bytes
    decode exactly like `encode` of the whole event).

    `compact`: the token-event wire shape of docs/events.md: schema version, tenant id and
    fence only, the rest is the record's key and timestamp (readers use `decode_record`).
    Otherwise request id, producer id, event time and trace context are in the value too,
    for readers that still decode the value alone.
    """

    __slots__ = ("_compact", "_prefix", "headers")

    def __init__(self, template: events_pb2.Event, *, compact: bool) -> None:
        envelope = events_pb2.Event()
        envelope.CopyFrom(template)
        envelope.ClearField("event_time")
        if compact:
            for name in ("request_id", "producer_id", "trace"):
                envelope.ClearField(name)
        self._compact = compact
        self._prefix = envelope.SerializeToString()
        envelope.token_delta.SetInParent()
        self.headers = headers(envelope)

    def value(self, seq: int, text: str, token_ids: list[int]) -> bytes:
        ev = events_pb2.Event(
            token_delta=events_pb2.TokenDelta(seq=seq, text=text, token_ids=token_ids)
        )
        if not self._compact:
            ev.event_time.FromNanoseconds(time.time_ns())
        return self._prefix + ev.SerializeToString()


class Record(Protocol):
    """What `decode_record` reads of a consumed record (aiokafka's `ConsumerRecord`)."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def timestamp(self) -> int: ...


def decode_record(record: Record) -> events_pb2.Event:
    """`decode` of a consumed record: a value without request id or event time (a compact
    token event) takes them from the record key and timestamp (milliseconds)."""
    return decode(record.value, record.key, record.timestamp)


def decode(
    value: bytes | None, key: bytes | None = None, timestamp_ms: int | None = None
) -> events_pb2.Event:
    """The event of a record value. `key` and `timestamp_ms` (the record's) fill in a request
    id and an event time the value leaves out; a value that has them keeps its own."""
    if value is None:
        raise DecodeError("empty record value (tombstone)")
    event = events_pb2.Event()
    try:
        event.ParseFromString(value)
    except _ProtobufDecodeError as exc:
        raise DecodeError(f"not a protobuf Event: {exc}") from None
    if event.schema_version == 0:
        raise DecodeError("schema_version missing (not an llmstream event)")
    if event.schema_version > SCHEMA_VERSION:
        raise DecodeError(
            f"schema_version {event.schema_version} is newer than supported {SCHEMA_VERSION}"
        )
    body = event.WhichOneof("body")
    # Only a token delta may leave its request id and time to the record (the compact shape):
    # any other event without a request id is malformed, whatever its key says.
    compact = body == "token_delta"
    if not event.request_id:
        if not compact:
            raise DecodeError(f"request_id missing (only a token delta may omit it; got {body})")
        if not key:
            raise DecodeError("request_id missing (neither in the value nor the record key)")
        try:
            event.request_id = key.decode()
        except UnicodeDecodeError:
            raise DecodeError("request_id missing and the record key is not UTF-8") from None
    if body is None:
        raise DecodeError("event body missing or of an unknown kind")
    # A record without a timestamp says -1.
    has_time = event.HasField("event_time")
    if compact and not has_time and timestamp_ms is not None and timestamp_ms >= 0:
        event.event_time.FromMilliseconds(timestamp_ms)
    return event


def event_time_ms(event: events_pb2.Event) -> int:
    return int(event.event_time.ToMilliseconds())
