"""The terminal event of a dead-lettered submit, pure (docs/worker.md, "Poison records").

A prompt record the worker cannot serve goes to the dead-letter topic. When it is still a
readable `submitted` of a request — an envelope that parses as protobuf (a newer schema version
included), with a request id equal to its key, a tenant, and a reply partition that exists in
the tokens topic — the worker also ends that request with a `failed` event (code
`dead_lettered`, the reason as message) on its reply partition: the gateway then tells its
client `done`, and the aggregator bills nothing and settles the reservation. Anything less
readable (not protobuf, no request id, no tenant, another body kind, a reply partition no
gateway owns) names nobody who waits for an answer: it stays in the dead-letter topic only, and
a reservation it may hold is released by the gateway's reservation reaper.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError as ProtobufDecodeError

from llmstream.v1 import common_pb2, events_pb2
from worker.core import Envelope

DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class DeadLetterTerminal:
    partition: int  # of the tokens topic
    event: events_pb2.Event


def readable_submit(key: bytes | None, value: bytes | None) -> events_pb2.Event | None:
    """The record as a `submitted` event naming its request and tenant, or None. No schema
    version check: a submit from a newer gateway still names who waits for it."""
    if not value:
        return None
    event = events_pb2.Event()
    try:
        event.ParseFromString(value)
    except ProtobufDecodeError:
        return None
    if event.WhichOneof("body") != "submitted" or not event.request_id or not event.tenant_id:
        return None
    if key is not None and key != event.request_id.encode():
        return None  # not keyed like a gateway's record: the body's ids are not to be trusted
    return event


def dead_letter_terminal(
    key: bytes | None,
    value: bytes | None,
    reason: str,
    *,
    tokens_partitions: int,
    producer_id: str,
    generation: int,
) -> DeadLetterTerminal | None:
    """The `failed` event that ends a dead-lettered submit, and where it goes; None: the
    record names nobody to answer (it stays DLQ-only)."""
    submit = readable_submit(key, value)
    if submit is None:
        return None
    partition = submit.submitted.reply.partition
    if not 0 <= partition < tokens_partitions:
        return None
    env = Envelope(
        request_id=submit.request_id,
        tenant_id=submit.tenant_id,
        producer_id=producer_id,
        traceparent=submit.trace.traceparent,
        tracestate=submit.trace.tracestate,
        generation=generation,
    )
    # Nothing was generated and the model never saw the prompt: nothing to bill.
    event = env.failed(
        DEAD_LETTERED, f"the request could not be processed: {reason}", common_pb2.Usage(), 0
    )
    return DeadLetterTerminal(partition, event)
