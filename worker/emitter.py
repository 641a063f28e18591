"""Produces one request's events in order and coalesces its deltas.

Every send goes through one lock, so events leave in call order (aiokafka appends to the
partition's batch in `send` order). A delta that arrives while the previous event is not yet
acknowledged waits in the coalescer; the previous event's acknowledgement triggers the flush
(natural batching: the deltas that arrived meanwhile leave as one event), and so does a timer
when the coalescing delay is finite (`coalesce_s=inf`: no timer at all). The hot path creates
no task per token.

Why the acknowledgement is the moment to flush: aiokafka keeps one produce request in flight
per broker (its sender skips nodes with a request in flight), so a record appended while the
previous event's request is in flight leaves with the next request whether it was appended
early (by a timer) or at the acknowledgement; flushing early only cuts the same tokens into
more events. Every send
first asks the worker's `ProduceGate` (worker/lease.py): a worker that may have lost its
partitions writes nothing until the group confirms it.

Token events leave through `codec.TokenDeltaEncoder`: without a content-type header, and in the
compact shape (docs/events.md, "Token events") without the request id, event time, producer id
and trace context, which the record key, the record timestamp and the attempt's `started`
carry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from llmstream import codec
from llmstream.v1 import common_pb2, events_pb2
from worker.coalesce import Coalescer
from worker.core import Envelope
from worker.lease import ProduceGate

# The compact token-event shape (docs/events.md): every reader of the tokens topic decodes
# with `codec.decode_record` (the request id from the record key, the event time from the
# record timestamp): the gateway's feed, the aggregator (projection and `llmstream replay`),
# worker takeover, the chaos checker and the test collectors. Trace context is on `started`
# and the terminal events only.
COMPACT_TOKEN_EVENTS = True


class Producer(Protocol):
    """What the emitter needs of `AIOKafkaProducer`: `send` returns the acknowledgement's
    future once the record is in a batch."""

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes,
        partition: int,
        headers: list[tuple[str, bytes]],
    ) -> asyncio.Future[Any]: ...


class Emitter:
    def __init__(
        self,
        producer: Producer,
        topic: str,
        partition: int,
        env: Envelope,
        *,
        gate: ProduceGate,
        coalesce_s: float,
        coalesce_bytes: int,
        last_seq: int = 0,
        token_ids: Sequence[int] = (),
        compact: bool = COMPACT_TOKEN_EVENTS,
    ) -> None:
        self._producer = producer
        self._gate = gate
        self.topic = topic
        self.partition = partition
        self.env = env
        self.last_seq = last_seq
        self.token_ids = list(token_ids)
        self.first_seq = last_seq  # what the log held before this worker's attempt
        self.first_token_count = len(self.token_ids)
        self.coalescer = Coalescer(coalesce_s, coalesce_bytes)
        self._compact = compact
        self._deltas = codec.TokenDeltaEncoder(env.event(), compact=compact)
        self._key = env.request_id.encode()
        self._lock = asyncio.Lock()
        self._last: asyncio.Future[Any] | None = None
        self._futures: list[asyncio.Future[Any]] = []
        self._armed = False
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self.events = 0
        self.deltas_in = 0

    async def _send(self, event: events_pb2.Event) -> None:
        await self._send_raw(codec.encode(event), codec.headers(event))

    async def _send_raw(self, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        if not self._gate.is_open():
            await self._gate.wait()
        fut = await self._producer.send(
            self.topic, value=value, key=self._key, partition=self.partition, headers=headers
        )
        if len(self._futures) > 64:
            # Keep only what `settle` still has to wait for (or report).
            self._futures = [
                f for f in self._futures if not f.done() or f.cancelled() or f.exception()
            ]
        self._futures.append(fut)
        self._last = fut
        self.events += 1

    async def begin_attempt(self, attempt: int) -> None:
        """Events from now on belong to `attempt` (their fence)."""
        await self.flush()  # buffered deltas leave with the previous attempt's fence
        async with self._lock:
            self.env = dataclasses.replace(self.env, attempt=attempt)
            self._deltas = codec.TokenDeltaEncoder(self.env.event(), compact=self._compact)

    async def send(self, event: events_pb2.Event, *, gates: bool = True) -> None:
        """`gates=False`: the next delta does not wait for this event's acknowledgement
        (`started`: the first token follows it at once, often in the same batch, instead of
        an ack round trip later)."""
        async with self._lock:
            last = self._last
            await self._send(event)
            if not gates:
                self._last = last

    def previous_acked(self) -> bool:
        return self._last is None or self._last.done()

    @property
    def tokens(self) -> int:
        """Tokens of the request so far, buffered ones included."""
        return len(self.token_ids) + self.coalescer.pending_tokens

    async def push(self, text: str, token_ids: list[int]) -> None:
        """A model delta: sent at once if the pipeline is idle, else coalesced."""
        self.deltas_in += 1
        now = time.monotonic()
        self.coalescer.add(text, token_ids, now)
        if self.coalescer.due(now, self.previous_acked()):
            await self.flush()
        elif not self._armed:
            self._armed = True
            deadline = self.coalescer.deadline()
            assert deadline is not None
            if math.isfinite(deadline):
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(max(0.0, deadline - now), self._fire)
            if self._last is not None:
                self._last.add_done_callback(self._on_ack)

    def _on_ack(self, _: asyncio.Future[Any]) -> None:
        self._fire()

    def _fire(self) -> None:
        if not self._armed:
            return
        self._disarm()
        task = asyncio.ensure_future(self.flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def _disarm(self) -> None:
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> None:
        async with self._lock:
            self._disarm()
            if self.coalescer.empty:
                return
            text, ids, _ = self.coalescer.take()
            self.last_seq += 1
            self.token_ids.extend(ids)
            value = self._deltas.value(self.last_seq, text, ids)
            await self._send_raw(value, self._deltas.headers)

    async def settle(self) -> None:
        """Wait until every event produced so far is acknowledged (raises on failure)."""
        for task in list(self._flushes):
            await task
        pending = self._futures
        self._futures = []
        for fut in pending:
            await fut

    def close(self) -> None:
        self._disarm()
        for task in self._flushes:
            task.cancel()

    def usage(self, prompt_tokens: int) -> common_pb2.Usage:
        return common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(self.token_ids))
