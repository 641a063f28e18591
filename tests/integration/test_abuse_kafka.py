"""Garbage on every topic of llmstream/topics.py (prompts, tokens, and the dead-letter topic),
against real processes (`local_stack`: model server, worker, aggregator, gateway).

Records that are not llmstream events (bytes, tombstones, other messages, unknown schema
versions, no request id, no body, 512 KiB of noise, lying headers) and events that make no
sense (a reply partition that does not exist, a submit without a prompt, a terminal event of
an unknown request, ...) are dead-lettered with a reason (worker: prompts; aggregator: prompts
and tokens) or skipped with a log line (gateway: tokens; nobody consumes the dead-letter
topic). No process crashes or logs a traceback, and a good request submitted afterwards
streams to the end and is projected.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from llmstream import codec, config, kafka
from llmstream.v1 import common_pb2, events_pb2
from llmstream_tools import stack
from llmstream_tools.testing.gateway import Client

pytestmark = pytest.mark.integration

PARTITIONS = 2
Headers = list[tuple[str, bytes]]


def _event(request_id: str = "req_garbage", schema: int = 1) -> events_pb2.Event:
    ev = codec.new_event(request_id, "t_ghost", "garbage-producer")
    ev.schema_version = schema
    return ev


def undecodable() -> list[tuple[str, bytes | None, Headers]]:
    """(label, value, headers) of records that are not llmstream events."""
    newer = _event(schema=99)
    newer.cancel_requested.reason = "from the future"
    no_id = _event("")
    no_id.cancel_requested.reason = "x"
    no_body = _event()
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=4).SerializeToString()
    noise = random.Random(7).randbytes(512 * 1024)
    lying = [("event-type", b"cancel_requested"), ("content-type", codec.CONTENT_TYPE)]
    return [
        ("bytes", b"\xff\x00 not protobuf \xfe", []),
        ("empty", b"", []),
        ("tombstone", None, []),
        ("json", b'{"type": "submit", "prompt": "hi"}', [("event-type", b"submitted")]),
        ("other-message", usage, []),
        ("schema-99", newer.SerializeToString(), []),
        ("no-request-id", no_id.SerializeToString(), []),
        ("no-body", no_body.SerializeToString(), []),
        ("noise-512k", noise, lying),
        ("lying-headers", b"\x0a\x03abc", lying),
    ]


def nonsense_prompts() -> list[tuple[str, events_pb2.Event]]:
    """Events that decode but cannot be served as they are (prompts topic)."""
    out = []
    ev = _event("req_bad_partition")
    ev.submitted.model = "synthetic"
    ev.submitted.prompt.text = "hello"
    ev.submitted.max_tokens = 3
    ev.submitted.reply.partition = 999  # no such partition: dead-lettered
    out.append(("bad-partition", ev))
    ev = _event("req_negative_partition")
    ev.submitted.CopyFrom(out[0][1].submitted)
    ev.submitted.reply.partition = -1
    out.append(("negative-partition", ev))
    ev = _event("req_unknown_topic")  # refused at once, not after a metadata timeout
    ev.submitted.CopyFrom(out[0][1].submitted)
    ev.submitted.reply.topic = "no.such.topic"
    ev.submitted.reply.partition = 0
    out.append(("unknown-topic", ev))
    ev = _event("req_no_prompt")  # the model server refuses it: a failed event
    ev.submitted.model = "synthetic"
    ev.submitted.max_tokens = 3
    out.append(("no-prompt", ev))
    ev = _event("req_no_model")
    ev.submitted.model = "no-such-model"
    ev.submitted.prompt.text = "x"
    out.append(("unknown-model", ev))
    ev = _event("req_never_submitted")
    ev.cancel_requested.reason = "client"
    out.append(("cancel-unknown", ev))
    ev = _event("req_wrong_topic")
    ev.token_delta.seq = 1
    ev.token_delta.text = "a token on the prompts topic"
    out.append(("delta-on-prompts", ev))
    return out


def nonsense_tokens() -> list[tuple[str, events_pb2.Event]]:
    """Events that decode but belong to no request (tokens topic)."""
    out = []
    for seq in (0, 1, 2**32 - 1):
        ev = _event("req_nobody")
        ev.token_delta.seq = seq
        ev.token_delta.text = "\x00 unowned"
        out.append((f"delta-{seq}", ev))
    ev = _event("req_nobody")
    ev.completed.finish_reason = common_pb2.FINISH_REASON_LENGTH
    ev.completed.usage.completion_tokens = 2**31
    ev.completed.last_seq = 7
    out.append(("completed-unknown", ev))
    ev = _event("req_nobody2")
    ev.failed.code = "?" * 1000
    out.append(("failed-unknown", ev))
    return out


async def dead_letters(
    bootstrap: str, topic: str, enough: Any, within_s: float = 30.0
) -> list[dict[str, str]]:
    """Headers of the records on the dead-letter topic, read at least to its current end and
    then until `enough(headers)`."""
    consumer = AIOKafkaConsumer(
        **kafka.Connection(bootstrap).client_kwargs("test"), group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)  # the dead-letter topic has one partition
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[dict[str, str]] = []
        deadline = time.monotonic() + within_s
        while not enough(out) or await consumer.position(tp) < end:
            assert time.monotonic() < deadline, f"{len(out)} dead letters: {out[-3:]}"
            batch = await consumer.getmany(tp, timeout_ms=500)
            out.extend(headers_of(r) for r in batch.get(tp, []))
        return out
    finally:
        await consumer.stop()


def headers_of(rec: Any) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in rec.headers or ()}


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    records: Iterable[tuple[str, bytes | None, Headers]],
    partitions: int = PARTITIONS,
) -> int:
    futures = []
    for label, value, headers in records:
        for p in range(partitions):  # every partition: every consumer of the topic sees them
            futures.append(
                await producer.send(
                    topic, value, key=f"garbage-{label}".encode(), partition=p, headers=headers
                )
            )
    await asyncio.gather(*futures)
    return len(futures)


async def test_garbage_on_every_topic_is_dead_lettered_or_skipped(tmp_path: Path) -> None:
    bootstrap = config.kafka_bootstrap()
    async with stack.local_stack(tmp_path, workers=1, partitions=PARTITIONS) as st:
        dlq = st.env["LLMSTREAM_TOPIC_DLQ"]
        _tenant, key = await st.tenant_key("standard")
        c = await Client.connect(st.gateway_port, key)
        await c.submit("before", max_tokens=4)  # everything is up and consuming
        before = (await c.wait_ref("before", 20))["request_id"]
        await c.wait(lambda: c.streams[before].done is not None, 30)

        producer = AIOKafkaProducer(
            **kafka.Connection(bootstrap).client_kwargs("test"), max_request_size=2 << 20
        )
        await producer.start()
        try:
            bad = undecodable()
            n_bad = await produce(producer, st.prompts_topic, bad)
            await produce(producer, st.tokens_topic, bad)
            await produce(producer, dlq, bad[:3], 1)  # nobody reads it; it must harm nothing
            as_records = [
                (label, codec.encode(ev), codec.headers(ev)) for label, ev in nonsense_prompts()
            ]
            for label, value, headers in as_records:  # one each (partition 0)
                await producer.send_and_wait(
                    st.prompts_topic, value, key=label.encode(), partition=0, headers=headers
                )
            for _label, ev in nonsense_tokens():
                for p in range(PARTITIONS):
                    await producer.send_and_wait(
                        st.tokens_topic, codec.encode(ev), key=codec.key(ev), partition=p
                    )
        finally:
            await producer.stop()

        # A good request after the garbage streams to the end and is projected.
        await c.submit("after", max_tokens=6)
        rid = (await c.wait_ref("after", 20))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None, 30)
        done = c.streams[rid].done
        assert done is not None and done["finish_reason"] == "length"
        assert done["usage"]["completion_tokens"] == 6
        await c.close()

        # Dead letters: the worker parks the undecodable prompts and the unroutable submits;
        # the aggregator the undecodable records of both topics; each with a reason. `dlq-by`
        # names who parked it: a worker id, or the aggregator's consumer group.
        aggregator_group = st.env["LLMSTREAM_AGGREGATOR_GROUP"]

        def by_worker_of(letters: list[dict[str, str]]) -> list[dict[str, str]]:
            return [h for h in letters if h.get("dlq-by", "") not in ("", aggregator_group)]

        def by_aggregator_of(letters: list[dict[str, str]]) -> list[dict[str, str]]:
            return [h for h in letters if h.get("dlq-by") == aggregator_group]

        letters = await dead_letters(
            bootstrap,
            dlq,
            lambda hs: (
                len(by_worker_of(hs)) >= n_bad + 3 and len(by_aggregator_of(hs)) >= 2 * n_bad
            ),
        )
        await asyncio.sleep(1)  # and then no more
        letters = await dead_letters(bootstrap, dlq, lambda hs: True)
        by_worker, by_aggregator = by_worker_of(letters), by_aggregator_of(letters)
        assert len(by_worker) == n_bad + 3  # + partitions 999 and -1, the unknown topic
        assert len(by_aggregator) == 2 * n_bad
        assert all(h["dlq-reason"] for h in by_worker + by_aggregator)
        reasons = {h["dlq-reason"] for h in by_worker}
        assert any("schema_version 99" in r for r in reasons)
        assert any("reply partition 999" in r for r in reasons)
        assert any("'no.such.topic' is not the tokens topic" in r for r in reasons)
        assert {h["dlq-source"].split("/")[0] for h in by_aggregator} == {
            st.prompts_topic,
            st.tokens_topic,
        }

        with psycopg.connect(st.database_url, autocommit=True) as conn:
            for _ in range(60):
                row = conn.execute(
                    "SELECT status, completion_tokens FROM requests WHERE request_id = %s", (rid,)
                ).fetchone()
                if row is not None and row[0] == "completed":
                    break
                await asyncio.sleep(0.5)
            assert row == ("completed", 6)
            # The nonsense submits that decode ended as failed requests, refused by the worker's
            # tier check before any model call: their tenant does not exist.
            failed = {
                str(r[0]): (r[1], r[2], r[3])
                for r in conn.execute(
                    "SELECT request_id, status, error_code, completion_tokens FROM requests"
                    " WHERE request_id IN ('req_no_prompt', 'req_no_model')"
                ).fetchall()
            }
        assert failed == {
            "req_no_prompt": ("failed", "unknown_tenant", 0),
            "req_no_model": ("failed", "unknown_tenant", 0),
        }

        assert {name: p.poll() for name, p in st.procs.items()} == dict.fromkeys(st.procs)
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in st.procs}
        assert "poison record sent to the dead-letter topic" in logs["worker-0"]
        assert '"reason": "undecodable"' in logs["aggregator"]
        assert "undecodable record skipped" in logs["gateway"]
        for name, text in logs.items():
            assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-3000:]}"
