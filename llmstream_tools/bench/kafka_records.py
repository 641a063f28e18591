"""The token events `llmstream bench kafka-clients` sends, and what each carries byte by byte
(Kafka record format v2): the record as the worker's emitter writes it, as it wrote it before
issue 21, in the compact shape and after the cuts not made.

Records are built by the emitter's own code (`worker.core.Envelope` for the attempt's envelope,
`codec.TokenDeltaEncoder` for the value and headers, the request id as the key), so the audit
measures what the worker produces. Print it with:

    .venv/bin/python -m llmstream_tools.bench.kafka_records
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from llmstream import codec
from llmstream.v1 import events_pb2
from worker.core import Envelope
from worker.emitter import COMPACT_TOKEN_EVENTS

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
# A fence as a worker stamps it (docs/events.md, Fencing): a few rebalances in, attempt 1.
GENERATION = 12
ATTEMPT = 1
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


def envelope(rid: str, trace: bool) -> Envelope:
    """The attempt's envelope as the worker's executor makes it (worker.core.envelope_of)."""
    return Envelope(
        request_id=rid,
        tenant_id=TENANT_ID,
        producer_id=PRODUCER_ID,
        traceparent=traceparent(rid) if trace else "",
        tracestate=TRACESTATE,
        generation=GENERATION,
        attempt=ATTEMPT,
    )


def token_record(
    rid: str, tokens: int, trace: bool, *, compact: bool, at_ns: int | None = None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a token event as the emitter writes it (`Emitter.flush`);
    `at_ns` fixes the event time of the full shape (the emitter stamps the clock)."""
    enc = codec.TokenDeltaEncoder(envelope(rid, trace).event(), compact=compact)
    value = enc.value(SEQ, "".join(TOKENS[:tokens]), TOKEN_IDS[:tokens])
    if at_ns is not None and not compact:
        event = events_pb2.Event.FromString(value)
        event.event_time.FromNanoseconds(at_ns)
        value = event.SerializeToString()
    return rid.encode(), value, enc.headers


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
    """REQUESTS token events of one kind, as the emitter writes them now."""
    tokens, trace = KINDS[kind]
    out = []
    for i in range(REQUESTS):
        key, value, headers = token_record(
            request_id(i), tokens, trace, compact=COMPACT_TOKEN_EVENTS
        )
        out.append(Record(key, value, headers, i % PARTITIONS))
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


# Cumulative from what the worker writes now ("today": kafka_clients labels its records with
# it); the record before issue 21 is audited apart (`before_issue_21`).
CUTS = [
    Cut(
        "today",
        "the emitter's own record (codec.TokenDeltaEncoder, key = request id), "
        + ("compact" if COMPACT_TOKEN_EVENTS else "full")
        + " shape: no content-type header on token events (issue 21)",
    ),
    Cut(
        "compact shape: no trace context, request_id, event_time, producer_id "
        "(worker/emitter.py COMPACT_TOKEN_EVENTS)",
        "spans are per request (started and terminal events carry the trace); the request id "
        "is the record key and event_time the record timestamp (codec.decode_record); "
        "started names the worker",
    ),
    Cut(
        "+ no tenant_id in token events (not done)",
        "the gateway checks the tenant of every event it delivers (#17)",
    ),
    Cut(
        "+ request id 22 characters (base64url of the same 128 bits) instead of 36 (not done)",
        "'req_' + 32 hex spends 14 bytes of every key on the encoding; ids are made by the "
        "gateway and typed by clients",
    ),
]
BEFORE = Cut(
    "before issue 21",
    "full envelope on every event; content-type + event-type + traceparent headers",
)


def cut_record(step: int, tokens: int, trace: bool) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a token event at row `step` of CUTS (-1: before issue 21)."""
    rid = request_id(0)
    if step <= 0:
        compact = COMPACT_TOKEN_EVENTS and step == 0
        key, value, headers = token_record(rid, tokens, trace, compact=compact, at_ns=AUDIT_TIME_NS)
        if step < 0:
            headers = [("content-type", codec.CONTENT_TYPE), *headers]
        return key, value, headers
    key, value, headers = token_record(rid, tokens, trace, compact=True)
    if step >= 2:
        event = events_pb2.Event.FromString(value)
        event.ClearField("tenant_id")
        value = event.SerializeToString()
    if step >= 3:
        key = key[:22]  # the length of base64url(16 bytes) without padding
    return key, value, headers


EnvelopeField = Literal[
    "schema_version", "request_id", "tenant_id", "event_time", "trace", "producer_id", "fence"
]
ENVELOPE: tuple[EnvelopeField, ...] = get_args(EnvelopeField)


def _breakdown(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> dict[str, int]:
    """Bytes of each part of one record (protobuf sizes add up field by field)."""
    ev = events_pb2.Event.FromString(value)
    parts = {}
    for name in ENVELOPE:
        without = events_pb2.Event()
        without.CopyFrom(ev)
        without.ClearField(name)
        parts[f"value: {name}"] = ev.ByteSize() - without.ByteSize()
    body = events_pb2.Event(token_delta=ev.token_delta)
    parts["value: token_delta (seq, text, ids)"] = body.ByteSize()
    parts["key (request id)"] = len(key)
    for k, v in headers:
        parts[f"header {k}"] = len(k) + len(v)
    parts["record framing (lengths, attributes, deltas)"] = record_size(key, value, headers) - (
        len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)
    )
    parts["record batch header (once per batch)"] = BATCH_HEADER
    return parts


def _sizes(step: int, cut: Cut) -> dict[str, Any]:
    row: dict[str, Any] = {"cut": cut.name, "why": cut.why, "kinds": {}}
    for kind, (tokens, trace) in KINDS.items():
        key, value, headers = cut_record(step, tokens, trace)
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
    return row


def size_audit() -> dict[str, Any]:
    """Bytes per token of each kind at each row of CUTS and before issue 21; a breakdown of the
    commonest record (1 token, tracing on) as written now and in the compact shape."""
    # Packing ids is not a cut to make: proto3 packs repeated scalars already (one tag and one
    # length for the list, then a varint per id: 2-3 bytes in a 49k vocabulary).
    packed = events_pb2.TokenDelta(token_ids=[1, 2]).SerializeToString() == b"\x1a\x02\x01\x02"
    return {
        "steps": [_sizes(i, cut) for i, cut in enumerate(CUTS)],
        "before_issue_21": _sizes(-1, BEFORE),
        "breakdown_1_token_trace": _breakdown(*cut_record(0, 1, True)),
        "breakdown_1_token_trace_compact": _breakdown(*cut_record(1, 1, True)),
        "token_ids_packed": packed,
    }


if __name__ == "__main__":
    print(json.dumps(size_audit(), indent=1))
