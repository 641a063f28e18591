"""One submitted request on this worker, from its fetch to its end (or abandonment)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiokafka import TopicPartition

from llmstream.fold import RequestState
from llmstream.tracing import Span
from llmstream.v1 import events_pb2

if TYPE_CHECKING:
    from worker.emitter import Emitter


@dataclass(eq=False)
class Run:
    tp: TopicPartition  # the prompts partition it was read from
    offset: int
    record_ts: int  # the submit record's timestamp (ms): where a takeover read starts
    submit: events_pb2.Event
    # The record is below the partition's end offset at assignment: an earlier owner may have
    # produced some of its events, so the log is read (takeover) before it starts.
    needs_lookup: bool
    # Group generation of the partition's assignment: the owner part of its events' fence.
    generation: int = 0
    # Set when the fetch that brought this prompt was cut at the in-flight bound, so records
    # behind it (a cancel) may not have been fetched yet: the start then waits until the cancel
    # lookahead has read the partition to its end once after `fetched_at` (monotonic).
    fetched_at: float | None = None
    prior: RequestState | None = None  # what the log held at takeover (None: nothing read)
    cancel_reason: str | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # Stopped without a terminal event (revocation, drain timeout): its cancellation is not
    # an error, and its prompt stays uncommitted for the next owner.
    abandoned: bool = False
    task: asyncio.Task[None] | None = None
    emitter: Emitter | None = None
    tokens_span: Span | None = None  # `send <tokens>`: ended when the request leaves

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason or "cancelled"
            self.cancelled.set()
