"""Pure pieces of the worker: event construction and gRPC status classification."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from llmstream import codec
from llmstream.v1 import common_pb2, events_pb2

# Failure codes of RequestFailed (docs/events.md).
INVALID_REQUEST = "invalid_request"
MODEL_NOT_FOUND = "model_not_found"
MODEL_UNAVAILABLE = "model_unavailable"
CONTEXT_OVERFLOW = "context_overflow"
INTERNAL = "internal"

# Statuses after which another replica (or the same one later) may well succeed.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}
)


def failure_code(code: grpc.StatusCode, details: str) -> str:
    """RequestFailed.code for a non-retryable gRPC status of the model server."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CONTEXT_OVERFLOW if "context" in details.lower() else INVALID_REQUEST
    if code == grpc.StatusCode.NOT_FOUND:
        return MODEL_NOT_FOUND
    if code in RETRYABLE:
        return MODEL_UNAVAILABLE
    return INTERNAL


@dataclass(frozen=True)
class Envelope:
    """What every event of one request's attempt shares."""

    request_id: str
    tenant_id: str
    producer_id: str
    traceparent: str = ""
    tracestate: str = ""
    # The fence (docs/events.md): the group generation of the assignment this worker runs the
    # request under, and the current attempt (0 until one starts).
    generation: int = 0
    attempt: int = 0

    def event(self) -> events_pb2.Event:
        ev = codec.new_event(self.request_id, self.tenant_id, self.producer_id)
        if self.traceparent:
            ev.trace.traceparent = self.traceparent
            ev.trace.tracestate = self.tracestate
        ev.fence.SetInParent()
        ev.fence.generation = self.generation
        ev.fence.attempt = self.attempt
        return ev

    def started(
        self, worker_id: str, model_server: str, version: str, attempt: int, after_seq: int
    ) -> events_pb2.Event:
        ev = self.event()
        ev.started.worker_id = worker_id
        ev.started.model_server = model_server
        ev.started.model_version = version
        ev.started.attempt = attempt
        ev.started.resumed_after_seq = after_seq
        return ev

    def delta(self, seq: int, text: str, token_ids: list[int]) -> events_pb2.Event:
        ev = self.event()
        ev.token_delta.seq = seq
        ev.token_delta.text = text
        ev.token_delta.token_ids.extend(token_ids)
        return ev

    def completed(
        self,
        reason: common_pb2.FinishReason.ValueType,
        usage: common_pb2.Usage,
        timings: common_pb2.Timings | None,
        last_seq: int,
        message: str = "",
    ) -> events_pb2.Event:
        ev = self.event()
        c = ev.completed
        c.finish_reason = reason
        c.usage.CopyFrom(usage)
        if timings is not None:
            c.timings.CopyFrom(timings)
        c.last_seq = last_seq
        c.message = message
        return ev

    def failed(
        self, code: str, message: str, usage: common_pb2.Usage, last_seq: int
    ) -> events_pb2.Event:
        ev = self.event()
        f = ev.failed
        f.code = code
        f.message = message
        f.usage.CopyFrom(usage)
        f.last_seq = last_seq
        return ev


def envelope_of(submit: events_pb2.Event, producer_id: str, generation: int) -> Envelope:
    return Envelope(
        request_id=submit.request_id,
        tenant_id=submit.tenant_id,
        producer_id=producer_id,
        traceparent=submit.trace.traceparent,
        tracestate=submit.trace.tracestate,
        generation=generation,
    )
