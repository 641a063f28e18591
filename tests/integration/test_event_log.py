"""Events through the real Kafka broker: codec + keys + the shared fold."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from llmstream import codec, kafka
from llmstream.fold import Status, fold_all
from llmstream.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.integration


def request_events(request_id: str, n_tokens: int) -> list[events_pb2.Event]:
    out = []
    sub = codec.new_event(request_id, "tenant-a", "test")
    sub.submitted.model = "synthetic"
    sub.submitted.max_tokens = n_tokens
    out.append(sub)
    started = codec.new_event(request_id, "tenant-a", "test")
    started.started.attempt = 1
    out.append(started)
    for seq in range(1, n_tokens + 1):
        delta = codec.new_event(request_id, "tenant-a", "test")
        delta.token_delta.seq = seq
        delta.token_delta.text = f"<{request_id[-4:]}:{seq}>"
        delta.token_delta.token_ids.append(seq)
        out.append(delta)
    done = codec.new_event(request_id, "tenant-a", "test")
    done.completed.finish_reason = common_pb2.FINISH_REASON_LENGTH
    done.completed.last_seq = n_tokens
    done.completed.usage.completion_tokens = n_tokens
    out.append(done)
    return out


async def test_events_round_trip_through_kafka_and_fold(
    kafka_bootstrap: str, topic_name: str
) -> None:
    requests = {f"r-{uuid.uuid4().hex[:8]}": 5 + i for i in range(20)}
    producer = AIOKafkaProducer(
        **kafka.Connection(kafka_bootstrap).client_kwargs("test"),
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
    )
    await asyncio.wait_for(producer.start(), 15)
    try:
        sent = []
        # Interleave requests so per-key ordering is actually exercised.
        streams = {rid: request_events(rid, n) for rid, n in requests.items()}
        while any(streams.values()):
            for rid in list(streams):
                if streams[rid]:
                    event = streams[rid].pop(0)
                    sent.append(
                        await producer.send(
                            topic_name,
                            codec.encode(event),
                            key=codec.key(event),
                            headers=codec.headers(event),
                        )
                    )
        metadata = await asyncio.wait_for(asyncio.gather(*sent), 30)
    finally:
        await producer.stop()
    # Same key -> same partition, always.
    partitions_by_request: dict[str, set[int]] = {}
    all_events = [e for rid, n in requests.items() for e in request_events(rid, n)]
    assert len(metadata) == len(all_events)

    consumer = AIOKafkaConsumer(
        **kafka.Connection(kafka_bootstrap).client_kwargs("test"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await asyncio.wait_for(consumer.start(), 15)
    try:
        tps = [TopicPartition(topic_name, p) for p in range(3)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        assert sum(end.values()) == len(all_events)
        received: list[events_pb2.Event] = []
        while len(received) < len(all_events):
            batch = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 15)
            for tp, records in batch.items():
                for record in records:
                    event = codec.decode_record(record)
                    assert record.key == event.request_id.encode()
                    assert (
                        dict(record.headers)["event-type"] == str(event.WhichOneof("body")).encode()
                    )
                    partitions_by_request.setdefault(event.request_id, set()).add(tp.partition)
                    received.append(event)
    finally:
        await consumer.stop()

    assert all(len(p) == 1 for p in partitions_by_request.values())
    states = fold_all(received)
    assert set(states) == set(requests)
    for rid, n in requests.items():
        state = states[rid]
        assert state.status is Status.COMPLETED
        assert state.last_seq == n
        assert state.text == "".join(f"<{rid[-4:]}:{s}>" for s in range(1, n + 1))
        assert (state.duplicates, state.missing_seqs) == (0, 0)
