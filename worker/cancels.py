"""Cancels that do not wait behind a paused partition.

A second, group-less consumer (the lookahead) reads the assigned prompt partitions from the
committed offset onwards and looks only at `cancel_requested` records (by header, without
decoding the others). A cancel of a running request applies at once; a cancel read ahead of
its submit is remembered (bounded), so that request ends `cancelled` without starting. The
group consumer reading the same cancel later is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from llmstream import codec, telemetry
from worker.metrics import WorkerMetrics
from worker.partitions import Partitions
from worker.run import Run

log = logging.getLogger("worker")

EARLY_LIMIT = 65536


def cancel_of(record: Any) -> tuple[str, str] | None:
    """(request id, reason) of a `cancel_requested` record; None for anything else (only a
    cancel's value is decoded)."""
    if b"cancel_requested" not in (v for k, v in record.headers or () if k == "event-type"):
        return None
    try:
        event = codec.decode(record.value)
    except codec.DecodeError:
        return None
    if event.WhichOneof("body") != "cancel_requested":
        return None
    return event.request_id, event.cancel_requested.reason


class EarlyCancels:
    """Cancels read ahead of their submit: request id -> reason, the oldest forgotten first."""

    def __init__(self, limit: int = EARLY_LIMIT) -> None:
        self._limit = limit
        self._reasons: OrderedDict[str, str] = OrderedDict()

    def remember(self, request_id: str, reason: str) -> None:
        self._reasons[request_id] = reason
        if len(self._reasons) > self._limit:
            self._reasons.popitem(last=False)

    def pop(self, request_id: str) -> str | None:
        return self._reasons.pop(request_id, None)


class CancelLookahead:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        partitions: Partitions,
        on_cancel: Callable[[str, str], None],
        metrics: WorkerMetrics,
    ) -> None:
        self._consumer = consumer
        self._partitions = partitions
        self._on_cancel = on_cancel
        self._metrics = metrics
        self._assigned: set[TopicPartition] = set()

    async def run(self) -> None:
        """Runs until cancelled; Kafka errors are retried, anything else ends it (and the
        worker's supervisor stops the worker)."""
        while True:
            await self._follow_assignment()
            if not self._assigned:
                self._metrics.prompt_lag = {}
                await asyncio.sleep(0.1)
                continue
            try:
                batch = await self._consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                log.warning("cancel lookahead failed", extra=telemetry.fields(error=repr(exc)))
                await asyncio.sleep(1.0)
                continue
            for tp, records in batch.items():
                if self._partitions.get(tp) is None:
                    continue
                for rec in records:
                    found = cancel_of(rec)
                    if found is not None:
                        self._on_cancel(*found)
            await self._record_positions()

    async def _follow_assignment(self) -> None:
        """Read exactly the worker's partitions; a new one from its committed offset."""
        # A snapshot: a rebalance may revoke partitions during the seeks below (they await);
        # the next round follows the assignment it left.
        states = dict(self._partitions.states)
        want = set(states)
        if want == self._assigned:
            return
        self._consumer.assign(list(want))
        for tp in want - self._assigned:
            start = states[tp].lookahead_from
            if start is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, start)
        self._assigned = want

    async def _record_positions(self) -> None:
        """When each partition was last read to its end, and its lag (a metric)."""
        now = time.monotonic()
        lag: dict[tuple[str, int], int] = {}
        for tp in self._assigned:
            state = self._partitions.get(tp)
            high = self._consumer.highwater(tp)
            if state is None or high is None:
                continue
            if await self._consumer.position(tp) >= high:
                state.lookahead_synced_at = now
            lag[(tp.topic, tp.partition)] = state.lag(high)
        self._metrics.prompt_lag = lag

    async def caught_up(self, run: Run, within_s: float = 0.5) -> None:
        """Wait (bounded) until the lookahead has read `run`'s partition to its end at least
        once since the prompt was fetched, so a cancel already in the log is applied before
        the request starts."""
        if run.fetched_at is None:
            return
        deadline = time.monotonic() + within_s
        while run.cancel_reason is None and time.monotonic() <= deadline:
            state = self._partitions.get(run.tp)
            if state is None or state.lookahead_synced_at >= run.fetched_at:
                return
            await asyncio.sleep(0.005)
