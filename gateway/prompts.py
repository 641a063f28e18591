"""What the gateway writes to the prompts topic: `submitted` (admission) and `cancel_requested`
(a client's cancel, a grace timer), keyed by request id, acknowledged by every in-sync replica
before the caller goes on."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from llmstream import codec, tracing
from llmstream.tracing import SpanKind, Status, StatusCode
from llmstream.v1 import events_pb2

# Longest wait for Kafka to acknowledge one prompt event (the producer itself retries within).
SEND_TIMEOUT_S = 30.0


class PromptWriter:
    def __init__(self, producer: AIOKafkaProducer, topic: str, gateway_id: str) -> None:
        self.producer = producer
        self.topic = topic
        self.gateway_id = gateway_id

    async def submit(self, event: events_pb2.Event) -> None:
        """Write a `submitted` event. It carries the producer span's context: the worker and
        the model server continue the request's trace from it."""
        span = tracing.tracer().start_span(
            f"send {self.topic}",
            kind=SpanKind.PRODUCER,
            attributes=tracing.kafka_attributes("send", self.topic, key=event.request_id),
        )
        event.trace.traceparent, event.trace.tracestate = tracing.trace_context_of(span)
        try:
            sent = await self._send(event)
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

    async def _send(self, event: events_pb2.Event) -> Any:
        fut = await self.producer.send(
            self.topic, codec.encode(event), key=codec.key(event), headers=codec.headers(event)
        )
        return await asyncio.wait_for(fut, SEND_TIMEOUT_S)
