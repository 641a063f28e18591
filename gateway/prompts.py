"""What the gateway writes to the prompts topic: `submitted` (admission) and `cancel_requested`
(a client's cancel, a grace timer), keyed by request id, acknowledged by every in-sync replica
before the caller goes on.

A write that fails did not necessarily fail to write: once the producer has taken the record
(its `send` returned), it retries on its own and may deliver it after we stopped waiting. Only
a refusal before that, or a broker's deterministic rejection (`surely_not_written`), means the
record will never be in the log; the admission releases the quota only then.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors

from llmstream import codec, tracing
from llmstream.tracing import SpanKind, Status, StatusCode
from llmstream.v1 import events_pb2

# Longest wait for Kafka to acknowledge one prompt event (the producer itself retries within,
# and goes on after it: the outcome of a write that timed out is unknown).
SEND_TIMEOUT_S = 30.0

# A broker rejects these the same way on every attempt: a record failing with one of them was
# never appended, whatever attempts came before.
REJECTED = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.InvalidTopicError,
    kafka_errors.CorruptRecordException,
)


@dataclass
class SendAttempt:
    """How far one write got: `handed_over` once the producer has the record (from then on it
    may be delivered whatever the caller sees)."""

    handed_over: bool = False


def surely_not_written(exc: BaseException, attempt: SendAttempt) -> bool:
    """Is the record of a failed write certainly not in the log, now or later? (pure)"""
    if not attempt.handed_over:
        return True  # the producer refused it before taking it (closed, too large, no metadata)
    return isinstance(exc, REJECTED)


class PromptWriter:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        gateway_id: str,
        send_timeout_s: float | None = None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.gateway_id = gateway_id
        self.send_timeout_s = SEND_TIMEOUT_S if send_timeout_s is None else send_timeout_s

    async def submit(self, event: events_pb2.Event, attempt: SendAttempt | None = None) -> None:
        """Write a `submitted` event (`attempt` says how far a failed write got). It carries the
        producer span's context: the worker and the model server continue the request's trace
        from it."""
        span = tracing.tracer().start_span(
            f"send {self.topic}",
            kind=SpanKind.PRODUCER,
            attributes=tracing.kafka_attributes("send", self.topic, key=event.request_id),
        )
        event.trace.traceparent, event.trace.tracestate = tracing.trace_context_of(span)
        try:
            sent = await self._send(event, attempt)
            span.set_attributes(
                {
                    "messaging.destination.partition.id": str(sent.partition),
                    "messaging.kafka.offset": sent.offset,
                }
            )
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    async def cancel(self, request_id: str, tenant_id: str, reason: str) -> None:
        ev = codec.new_event(request_id, tenant_id, self.gateway_id)
        ev.cancel_requested.reason = reason
        await self._send(ev)

    async def _send(self, event: events_pb2.Event, attempt: SendAttempt | None = None) -> Any:
        fut = await self.producer.send(
            self.topic, codec.encode(event), key=codec.key(event), headers=codec.headers(event)
        )
        if attempt is not None:
            attempt.handed_over = True
        return await asyncio.wait_for(fut, self.send_timeout_s)
