"""Takeover: what earlier owners already produced for a request (the log is the state).

Before a submit that an earlier owner may have served starts, the worker reads the request's
reply partition of the tokens topic, from the submit's timestamp minus a margin to the current
end, and folds the request's events with the shared `llmstream.fold.fold`. One read of all the
reply partitions of a fetched batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from llmstream import codec, kafka, telemetry
from llmstream.fold import RequestState, fold
from worker.run import Run

log = logging.getLogger("worker")

# Longest one reply partition may take to read. Continuing without knowing what the log holds
# could repeat tokens, so past this the worker stops instead (the next owner tries again).
READ_LIMIT_S = 60.0


def reply_partition(run: Run, tokens_topic: str) -> TopicPartition:
    reply = run.submit.submitted.reply
    return TopicPartition(reply.topic or tokens_topic, reply.partition)


def fold_records(
    states: dict[bytes, RequestState], records: Iterable[Any], wanted: set[bytes]
) -> None:
    """Fold the records of the wanted request ids (record keys) into `states`; records that do
    not decode are skipped (the aggregator dead-letters them)."""
    for rec in records:
        if rec.key not in wanted:
            continue
        try:
            event = codec.decode_record(rec)
        except codec.DecodeError:
            continue
        states[rec.key] = fold(states.get(rec.key), event)


class TakeoverReader:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        tokens_topic: str,
        margin_ms: int,
        read_limit_s: float = READ_LIMIT_S,
    ) -> None:
        self._consumer = consumer
        self._tokens_topic = tokens_topic
        self._margin_ms = margin_ms
        self._read_limit_s = read_limit_s

    async def lookup(self, runs: Iterable[Run]) -> None:
        """Sets each run's `prior`: its folded events, None if the log holds none. One read for
        every reply partition of the batch at once (a takeover moves requests of every reply
        partition together, and each read is a few round trips)."""
        by_tp: dict[TopicPartition, list[Run]] = {}
        for run in runs:
            by_tp.setdefault(reply_partition(run, self._tokens_topic), []).append(run)
        since = {
            tp: max(0, min(r.record_ts for r in group) - self._margin_ms)
            for tp, group in by_tp.items()
        }
        wanted = {r.request_id.encode() for group in by_tp.values() for r in group}
        states = await self._read(since, wanted)
        for tp, group in by_tp.items():
            for run in group:
                run.prior = states.get(run.request_id.encode())
            log.info(
                "takeover lookup",
                extra=telemetry.fields(
                    reply_partition=tp.partition,
                    requests=len(group),
                    with_events=sum(1 for r in group if r.prior is not None),
                ),
            )

    async def _read(
        self, since_ms: dict[TopicPartition, int], wanted: set[bytes]
    ) -> dict[bytes, RequestState]:
        tps = list(since_ms)
        found = await asyncio.wait_for(
            self._consumer.offsets_for_times(since_ms), kafka.CALL_TIMEOUT_S
        )
        ends = await kafka.end_offsets(self._consumer, tps)
        ranges = []
        for tp in tps:
            hit = found.get(tp)
            ranges.append(
                kafka.PartitionRange(tp, hit.offset if hit is not None else ends[tp], ends[tp])
            )
        states: dict[bytes, RequestState] = {}
        try:
            # A timeout cancels the read inside `read_range`, which ends the generator too.
            async with asyncio.timeout(self._read_limit_s):
                async for records in kafka.read_range(self._consumer, ranges):
                    fold_records(states, records, wanted)
        except TimeoutError:
            raise RuntimeError(
                f"takeover: cannot read {', '.join(str(r.tp) for r in ranges)} up to their ends"
            ) from None
        return states
