"""Compact token events through the real broker: the worker's emitter writes one request in the
full and one in the compact shape (docs/events.md, "Token events"); read back with
`codec.decode_record` (request id from the key, event time from the record timestamp) both
fold to the same request, and the compact records are smaller on the wire."""

from __future__ import annotations

import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from llmstream import codec, kafka
from llmstream.fold import RequestState, Status, fold
from llmstream.v1 import common_pb2
from worker.core import Envelope
from worker.emitter import Emitter
from worker.lease import ProduceGate

pytestmark = pytest.mark.integration

PARTITION = 1
DELTAS = [(f" word{i}", [1000 + i, 2000 + i]) for i in range(40)] + [("é", [195, 169])]


async def write_request(producer: AIOKafkaProducer, topic: str, rid: str, *, compact: bool) -> None:
    env = Envelope(
        request_id=rid,
        tenant_id="t_tenant",
        producer_id="worker-7",
        traceparent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        generation=5,
    )
    em = Emitter(
        producer,
        topic,
        PARTITION,
        env,
        gate=ProduceGate(suspect_after_s=3600),
        coalesce_s=0.0,  # one event per delta: the two shapes carry the same events
        coalesce_bytes=4096,
        compact=compact,
    )
    await em.begin_attempt(1)
    await em.send(em.env.started("worker-7", "ms:1", "v1", 1, 0), gates=False)
    for text, ids in DELTAS:
        await em.push(text, ids)
    await em.flush()
    usage = em.usage(prompt_tokens=4)
    await em.send(em.env.completed(common_pb2.FINISH_REASON_STOP, usage, None, em.last_seq))
    await em.settle()


async def test_compact_and_full_token_events_fold_alike_from_the_broker(
    kafka_bootstrap: str, topic_name: str
) -> None:
    conn = kafka.Connection(kafka_bootstrap)
    producer = kafka.event_producer(conn, "test-token-events")
    full_rid, compact_rid = f"req_{uuid.uuid4().hex}", f"req_{uuid.uuid4().hex}"
    before_ms = int(time.time() * 1000)
    await producer.start()
    try:
        await write_request(producer, topic_name, full_rid, compact=False)
        await write_request(producer, topic_name, compact_rid, compact=True)
    finally:
        await producer.stop()
    after_ms = int(time.time() * 1000)

    consumer = kafka.reader(conn, "test-token-events-reader")
    await consumer.start()
    states: dict[str, RequestState] = {}
    sizes: dict[str, list[int]] = {full_rid: [], compact_rid: []}
    try:
        tp = TopicPartition(topic_name, PARTITION)
        end = (await kafka.end_offsets(consumer, [tp]))[tp]
        async for batch in kafka.read_range(consumer, [kafka.PartitionRange(tp, 0, end)]):
            for rec in batch:
                event = codec.decode_record(rec)
                assert rec.key == event.request_id.encode()
                states[event.request_id] = fold(states.get(event.request_id), event)
                if event.WhichOneof("body") == "token_delta":
                    sizes[event.request_id].append(
                        len(rec.value) + sum(len(k) + len(v) for k, v in rec.headers)
                    )
                    assert event.tenant_id == "t_tenant"
    finally:
        await consumer.stop()

    full, compact = states[full_rid], states[compact_rid]
    for state in (full, compact):
        assert state.status is Status.COMPLETED and state.tenant_id == "t_tenant"
        assert state.text == "".join(t for t, _ in DELTAS)
        assert state.token_ids == [i for _, ids in DELTAS for i in ids]
        assert state.completion_tokens == 2 * len(DELTAS)
        assert state.missing_seqs == state.duplicates == state.fenced == 0
        assert state.worker_id == "worker-7" and state.attempts == 1
        # Wall-clock first token: the record timestamp for compact events, in this test's window.
        assert state.first_token_at_ms is not None
        assert before_ms <= state.first_token_at_ms <= after_ms
    assert compact.last_seq == full.last_seq == len(DELTAS)
    assert all(c < f / 2 for c, f in zip(sizes[compact_rid], sizes[full_rid], strict=True))
