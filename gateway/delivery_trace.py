"""Delivery spans: how long this gateway replica spent forwarding one request's tokens.

One CONSUMER span per request delivered here, from the first of its events that reached a
socket to its terminal event, parented by the worker's `send <tokens>` span (the traceparent
of the `started` and terminal events; compact token deltas carry none, docs/events.md). A
socket that follows a request from its submit sees `started` first. One that resumes mid-stream
may see a token delta first: its span then starts a trace of its own, marked
`llmstream.delivery.unparented` (keeping every request's `started` trace here to find the
parent would cost memory per request for a span that matters only on resumes). Span events
mark the first token and the finish; there is no span per token. Open spans are bounded: a request whose terminal never arrives here (the client
left, the watch moved to another replica) is ended when it is evicted, marked incomplete.
"""

from __future__ import annotations

from collections import OrderedDict

from llmstream import tracing
from llmstream.fold import TERMINAL_BODIES
from llmstream.tracing import Span, SpanKind
from llmstream.v1 import events_pb2


class DeliverySpans:
    def __init__(self, topic: str, limit: int = 20_000) -> None:
        self.topic = topic
        self.limit = limit
        # request id -> (span, first token seen)
        self._open: OrderedDict[str, tuple[Span, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def on_event(
        self, event: events_pb2.Event, partition: int, offset: int, delivered: int
    ) -> None:
        """`delivered`: how many sockets the router gave this event to."""
        rid = event.request_id
        entry = self._open.get(rid)
        if entry is None:
            if not delivered:
                return
            parent = tracing.context_of(event.trace.traceparent, event.trace.tracestate)
            span = tracing.tracer().start_span(
                f"process {self.topic}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=tracing.kafka_attributes(
                    "process", self.topic, partition=partition, key=rid, offset=offset
                ),
            )
            if not event.trace.traceparent:
                span.set_attribute("llmstream.delivery.unparented", True)
            entry = (span, False)
            self._open[rid] = entry
            while len(self._open) > self.limit:
                _, (old, _seen) = self._open.popitem(last=False)
                old.set_attribute("llmstream.delivery.incomplete", True)
                old.end()
        span, seen_token = entry
        body = event.WhichOneof("body")
        if body == "token_delta" and not seen_token:
            span.add_event("first_token", {"llmstream.seq": event.token_delta.seq})
            self._open[rid] = (span, True)
        elif body in TERMINAL_BODIES:
            terminal = getattr(event, body)
            span.add_event(
                "finish",
                {
                    "llmstream.outcome": body,
                    "llmstream.last_seq": terminal.last_seq,
                    "llmstream.sockets": delivered,
                },
            )
            span.end()
            del self._open[rid]
