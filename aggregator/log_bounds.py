"""Stored offsets against the log's bounds, checked whenever the aggregator seeks from
PostgreSQL: offsets that no longer fit mean lost bills or a recreated topic, and are said
loudly (they never stop the aggregator)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from aggregator.store import TopicPartitionKey
from llmstream.telemetry import fields

log = logging.getLogger("aggregator")


async def check_log_bounds(
    consumer: AIOKafkaConsumer,
    tps: set[TopicPartition],
    stored: dict[TopicPartitionKey, int],
    timeout_s: float,
) -> None:
    """Say loudly when stored offsets no longer fit the log: records deleted by retention
    before they were projected (lost bills), or a topic recreated (stored offsets past the
    end: every batch would be fenced until the group's rows are reset)."""
    known = [tp for tp in tps if (tp.topic, tp.partition) in stored]
    if not known:
        return
    try:
        first = await asyncio.wait_for(consumer.beginning_offsets(known), timeout_s)
        last = await asyncio.wait_for(consumer.end_offsets(known), timeout_s)
    except Exception as exc:
        log.debug("log bounds unavailable", extra=fields(error=str(exc)))
        return
    for tp in known:
        offset = stored[(tp.topic, tp.partition)]
        if offset < first[tp]:
            log.error(
                "records were deleted by retention before they were projected",
                extra=fields(
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=offset,
                    log_start=first[tp],
                    lost_offsets=first[tp] - offset,
                ),
            )
        elif offset > last[tp]:
            log.error(
                "stored offset is past the end of the log (topic recreated?): delete this "
                "group's consumer_offsets rows for the partition to start over",
                extra=fields(
                    topic=tp.topic, partition=tp.partition, stored=offset, log_end=last[tp]
                ),
            )
