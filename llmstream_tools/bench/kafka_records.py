"""The token events `llmstream bench kafka-clients` sends, and what each carries byte by byte
(Kafka record format v2): today's event and the proposed cuts (issue 21)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from llmstream import codec
from llmstream.v1 import events_pb2

PARTITIONS = 4
REQUESTS = 64  # request ids the backlog records are keyed by
WARMUP = 50  # records produced (and, at low rate, fetched) before any clock starts
FETCH_TIMEOUT_S = 0.2  # the gateway's getmany(timeout_ms=200)
FETCH_MAX_WAIT_MS = 100  # the gateway's owned-partitions reader (gateway/resources.py)
# Records handed to the loop at once, both clients (the aggregator's batch default; the gateway
# takes whatever aiokafka has, which at backlog would make aiokafka's batches far larger).
MAX_BATCH = 1000
LATENCY_KIND = "1-token + trace"  # the commonest record: one token, tracing always on

# Realistic field values: ids as the services make them (gateway/admission.py, llmstream_tools/
# admin.py), the worker id a Kubernetes pod gets (deploy/k8s/base/worker.yaml: the pod name),
# English-like tokens of a 49k vocabulary (SmolLM2's).
TENANT_ID = "t_3f9a1c07d2b84e65"
PRODUCER_ID = "llmstream-worker-7c9d5b8f6-q4x2z"
TOKENS = [" The", " model", " streams", " each", " token", " to", " the", " browser"]
TOKEN_IDS = [378, 1743, 22301, 2362, 9352, 288, 260, 7493]
SEQ = 37  # mid-stream
# The size audit's event time: fixed, so the audit does not vary by a byte from run to run (the
# varint of the nanoseconds is 4 or 5 bytes; 5 for 73 % of instants).
AUDIT_TIME_NS = 1_796_680_800_123_456_789
TRACESTATE = ""  # what our services write (no vendor state)


def request_id(i: int) -> str:
    return "req_" + uuid.UUID(int=0x5EED0000 + i).hex


def traceparent(rid: str) -> str:
    """W3C traceparent: version, 16-byte trace id, 8-byte parent span id, flags (sampled)."""
    trace_id = uuid.uuid5(uuid.NAMESPACE_URL, rid).hex
    return f"00-{trace_id}-{trace_id[:16]}-01"


def token_event(rid: str, tokens: int, trace: bool, at_ns: int | None = None) -> events_pb2.Event:
    """A token event as the worker writes it (same fields as worker.core.DeltaEncoder's)."""
    event = codec.new_event(rid, TENANT_ID, PRODUCER_ID)
    if at_ns is not None:
        event.event_time.FromNanoseconds(at_ns)
    if trace:
        event.trace.traceparent = traceparent(rid)
        event.trace.tracestate = TRACESTATE
    event.token_delta.seq = SEQ
    event.token_delta.text = "".join(TOKENS[:tokens])
    event.token_delta.token_ids.extend(TOKEN_IDS[:tokens])
    return event


class Record(NamedTuple):
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    partition: int


KINDS: dict[str, tuple[int, bool]] = {
    "1-token": (1, False),
    "1-token + trace": (1, True),
    "8-token": (8, False),
    "8-token + trace": (8, True),
}


def records(kind: str) -> list[Record]:
    tokens, trace = KINDS[kind]
    out = []
    for i in range(REQUESTS):
        ev = token_event(request_id(i), tokens, trace)
        out.append(Record(codec.key(ev), codec.encode(ev), codec.headers(ev), i % PARTITIONS))
    return out


# -- record size (Kafka record format v2: KIP-98) ----------------------------------------------

BATCH_HEADER = 61  # bytes of a record batch's header, paid once per batch (per record at low rate)


def _varint(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _zigzag(n: int) -> int:
    return _varint((n << 1) ^ (n >> 63))


def record_size(key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    """Bytes of one record inside a batch (first record: timestamp and offset deltas 0)."""
    body = 1 + _zigzag(0) + _zigzag(0)  # attributes, timestampDelta, offsetDelta
    body += _zigzag(len(key)) + len(key) + _zigzag(len(value)) + len(value)
    body += _zigzag(len(headers))
    for k, v in headers:
        body += _zigzag(len(k.encode())) + len(k.encode()) + _zigzag(len(v)) + len(v)
    return _zigzag(body) + body


@dataclass(frozen=True)
class Cut:
    name: str
    why: str


# Cumulative: each step keeps the previous ones. None changes the schema (every field stays, a
# token event just leaves some empty); the reader side would take them from the key, the record
# timestamp and the request's `started` event.
CUTS = [
    Cut("today", "content-type + event-type + traceparent headers; full envelope on every event"),
    Cut(
        "A: no content-type header on token events",
        "one schema per topic (docs/events.md); every reader decodes the value anyway",
    ),
    Cut(
        "B: + trace context only on started/terminal events",
        "spans are per request, never per token (llmstream/tracing.py): drops the traceparent "
        "header and the envelope's copy of it",
    ),
    Cut(
        "C: + no request_id, event_time, producer_id in token events",
        "request_id is the record key, the record timestamp (CreateTime, the producer's clock) "
        "is event_time, started names the worker",
    ),
    Cut(
        "D: + no tenant_id in token events",
        "submitted and started carry it; the fold keys state by request",
    ),
    Cut(
        "E: + request id 22 characters (base64url of the same 128 bits) instead of 36",
        "'req_' + 32 hex spends 14 bytes of every key on the encoding",
    ),
]


def cut_record(step: int, tokens: int, trace: bool) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a token event after cuts 1..step of CUTS."""
    rid = request_id(0)
    ev = token_event(rid, tokens, trace, AUDIT_TIME_NS)
    headers = codec.headers(ev)
    if step >= 1:
        headers = [h for h in headers if h[0] != "content-type"]
    if step >= 2:
        headers = [h for h in headers if h[0] not in ("traceparent", "tracestate")]
        ev.ClearField("trace")
    if step >= 3:
        for field in ("request_id", "event_time", "producer_id"):
            ev.ClearField(field)
    if step >= 4:
        ev.ClearField("tenant_id")
    key = rid.encode()
    if step >= 5:
        key = key[:22]  # the length of base64url(16 bytes) without padding
    return key, ev.SerializeToString(), headers


EnvelopeField = Literal[
    "schema_version", "request_id", "tenant_id", "event_time", "trace", "producer_id"
]
ENVELOPE: tuple[EnvelopeField, ...] = get_args(EnvelopeField)


def size_audit() -> dict[str, Any]:
    """Bytes per token of each kind after each cut; a breakdown of today's commonest record."""
    steps = []
    for i, cut in enumerate(CUTS):
        row: dict[str, Any] = {"cut": cut.name, "why": cut.why, "kinds": {}}
        for kind, (tokens, trace) in KINDS.items():
            key, value, headers = cut_record(i, tokens, trace)
            rec = record_size(key, value, headers)
            row["kinds"][kind] = {
                "key": len(key),
                "value": len(value),
                "headers": sum(len(k) + len(v) for k, v in headers),
                "record": rec,
                "bytes_per_token": round(rec / tokens, 1),
                # At low rate every record is its own batch (and its own produce request).
                "bytes_per_token_alone_in_batch": round((rec + BATCH_HEADER) / tokens, 1),
            }
        steps.append(row)
    ev = token_event(request_id(0), 1, True, AUDIT_TIME_NS)
    parts = {}
    for name in ENVELOPE:  # protobuf sizes add up field by field
        without = events_pb2.Event()
        without.CopyFrom(ev)
        without.ClearField(name)
        parts[f"value: {name}"] = ev.ByteSize() - without.ByteSize()
    body = events_pb2.Event(token_delta=ev.token_delta)
    parts["value: token_delta (seq, text, ids)"] = body.ByteSize()
    parts["key (request id)"] = len(codec.key(ev))
    for k, v in codec.headers(ev):
        parts[f"header {k}"] = len(k) + len(v)
    key, value, headers = codec.key(ev), codec.encode(ev), codec.headers(ev)
    parts["record framing (lengths, attributes, deltas)"] = record_size(key, value, headers) - (
        len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)
    )
    parts["record batch header (once per batch)"] = BATCH_HEADER
    # Packing ids is not a cut to make: proto3 packs repeated scalars already (one tag and one
    # length for the list, then a varint per id: 2-3 bytes in a 49k vocabulary).
    packed = events_pb2.TokenDelta(token_ids=[1, 2]).SerializeToString() == b"\x1a\x02\x01\x02"
    return {"steps": steps, "breakdown_1_token_trace": parts, "token_ids_packed": packed}
