"""Kafka record codec: protobuf `Event` envelopes, keys and headers.

Every llmstream topic carries `llmstream.v1.Event` values keyed by request id. A record that
cannot be decoded, or whose schema version is newer than this code knows, raises
`DecodeError` with a reason suitable for a dead-letter header.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

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
    """Record headers: content type, body kind (lets tools filter without decoding) and the
    W3C trace context (so tracing works even for consumers that don't decode)."""
    out = [
        ("content-type", CONTENT_TYPE),
        ("event-type", (event.WhichOneof("body") or "").encode()),
    ]
    if event.trace.traceparent:
        out.append(("traceparent", event.trace.traceparent.encode()))
        if event.trace.tracestate:
            out.append(("tracestate", event.trace.tracestate.encode()))
    return out


def decode(value: bytes | None) -> events_pb2.Event:
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
    if not event.request_id:
        raise DecodeError("request_id missing")
    if event.WhichOneof("body") is None:
        raise DecodeError("event body missing or of an unknown kind")
    return event


def event_time_ms(event: events_pb2.Event) -> int:
    return int(event.event_time.ToMilliseconds())
