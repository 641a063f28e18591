"""Test support for the worker (used by tests/integration/test_worker_*.py): real Kafka topics,
real model server and worker processes, a prompt producer and a tokens-topic collector that
checks the event contract. The pytest fixtures are in `worker_fixtures` (this module is also
used by `llmstream bench worker`, where pytest is not installed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from llmstream import codec, kafka
from llmstream.fold import RequestState, fold, is_terminal
from llmstream.v1 import common_pb2, events_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools import stack

BIN = Path(sys.executable).parent
MODEL = "synthetic"


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def term(self, within_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(within_s)


def start_model_server(tmp: Path, port: int, itl_ms: float = 5, ttft_ms: float = 5) -> Proc:
    log_path = tmp / f"model-server-{port}.log"
    cmd = [
        str(BIN / "llmstream"),
        "model-server",
        "--engine",
        "synthetic",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--synthetic-itl-ms",
        str(itl_ms),
        "--synthetic-ttft-ms",
        str(ttft_ms),
        "--max-concurrency",
        "1024",
        "--max-queue",
        "1024",
        "--drain-timeout-s",
        "0",
    ]
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return Proc(popen, log_path)


async def wait_model_server(addr: str, within_s: float = 20.0) -> None:
    end = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = model_service_pb2_grpc.ModelServiceStub(ch)
        while True:
            try:
                resp = await stub.ListModels(model_service_pb2.ListModelsRequest(), timeout=1)
                if resp.models:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"model server {addr} not ready")
            await asyncio.sleep(0.1)


@dataclass
class Topics:
    bootstrap: str
    prompts: str
    tokens: str
    dlq: str
    group: str
    partitions: int = 3

    def env(self, model_servers: Iterable[str], **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "LLMSTREAM_KAFKA_BOOTSTRAP": self.bootstrap,
                "LLMSTREAM_PRINCIPAL": "worker",
                "LLMSTREAM_TOPIC_PROMPTS": self.prompts,
                "LLMSTREAM_TOPIC_TOKENS": self.tokens,
                "LLMSTREAM_TOPIC_DLQ": self.dlq,
                "LLMSTREAM_WORKER_GROUP": self.group,
                "LLMSTREAM_MODEL_SERVERS": ",".join(model_servers),
                "LLMSTREAM_WORKER_SESSION_TIMEOUT_MS": "6000",
                "LLMSTREAM_WORKER_METRICS_PORT": "0",
                # The tenants of these tests' events are not in PostgreSQL; the tier check's
                # own tests (test_worker_tiers.py) turn it on.
                "LLMSTREAM_WORKER_TIER_CHECK": "0",
                "LLMSTREAM_LOG_LEVEL": "INFO",
            }
        )
        env.update(extra)
        return env


async def create_topics(bootstrap: str, partitions: int = 3) -> Topics:
    base = f"test.w{uuid.uuid4().hex[:10]}"
    topics = Topics(bootstrap, f"{base}.prompts", f"{base}.tokens", f"{base}.dlq", f"{base}.g")
    await stack.create_topics(
        bootstrap, {topics.prompts: partitions, topics.tokens: partitions, topics.dlq: 1}
    )
    return topics


async def delete_topics(topics: Topics) -> None:
    await stack.delete_topics(topics.bootstrap, [topics.prompts, topics.tokens, topics.dlq])


def start_worker(tmp: Path, env: dict[str, str], worker_id: str, *args: str) -> Proc:
    log_path = tmp / f"{worker_id}.log"
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(
            [str(BIN / "llmstream"), "worker", "--id", worker_id, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Proc(popen, log_path)


def prompt_text(i: int) -> str:
    return f"request number {i}: tell me a story"


def submit_event(
    request_id: str,
    text: str,
    max_tokens: int,
    reply_topic: str,
    reply_partition: int,
    timeout_ms: int = 0,
) -> events_pb2.Event:
    ev = codec.new_event(request_id, "tenant-test", "test")
    s = ev.submitted
    s.model = MODEL
    s.prompt.text = text
    s.sampling.temperature = 0.0
    s.max_tokens = max_tokens
    s.reply.topic = reply_topic
    s.reply.partition = reply_partition
    s.reply.gateway_id = "gw-test"
    s.timeout_ms = timeout_ms
    ev.trace.traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    return ev


def cancel_event(request_id: str, reason: str = "client") -> events_pb2.Event:
    ev = codec.new_event(request_id, "tenant-test", "test")
    ev.cancel_requested.reason = reason
    return ev


async def produce(bootstrap: str, topic: str, events: Iterable[events_pb2.Event]) -> None:
    producer = AIOKafkaProducer(
        **kafka.Connection(bootstrap).client_kwargs("test-worker-harness"),
        enable_idempotence=True,
        acks="all",
    )
    await producer.start()
    try:
        futs = [
            await producer.send(
                topic, codec.encode(ev), key=codec.key(ev), headers=codec.headers(ev)
            )
            for ev in events
        ]
        for f in futs:
            await f
    finally:
        await producer.stop()


@dataclass
class Collected:
    events: dict[str, list[events_pb2.Event]] = field(default_factory=dict)
    partitions: dict[str, set[int]] = field(default_factory=dict)

    def state(self, rid: str) -> RequestState:
        st: RequestState | None = None
        for ev in self.events.get(rid, []):
            st = fold(st, ev)
        assert st is not None, f"no events for {rid}"
        return st

    def terminal_count(self, rid: str) -> int:
        return sum(1 for e in self.events.get(rid, []) if is_terminal(e))

    def check_contract(self, rid: str) -> RequestState:
        """Seq 1..n without gap or repeat, exactly one terminal and it comes last."""
        evs = self.events.get(rid, [])
        assert evs, f"{rid}: no events"
        seqs = [e.token_delta.seq for e in evs if e.HasField("token_delta")]
        assert seqs == list(range(1, len(seqs) + 1)), f"{rid}: seqs {seqs}"
        assert self.terminal_count(rid) == 1, f"{rid}: {self.terminal_count(rid)} terminals"
        last = evs[-1]
        assert is_terminal(last), f"{rid}: ends with {last}"
        term = last.completed if last.HasField("completed") else last.failed
        assert term.last_seq == len(seqs), f"{rid}: last_seq {term.last_seq} != {len(seqs)}"
        assert len(self.partitions[rid]) == 1, f"{rid}: events on several partitions"
        return self.state(rid)


async def reader(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    """A started group-less consumer reading `topic` from the beginning."""
    consumer = AIOKafkaConsumer(
        topic,
        **kafka.Connection(bootstrap).client_kwargs("test-worker-harness"),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await asyncio.wait_for(consumer.start(), 15)
    return consumer


async def collect(
    bootstrap: str, topic: str, request_ids: Iterable[str], within_s: float = 30.0
) -> Collected:
    """Read the tokens topic until every request has a terminal event (or the timeout)."""
    wanted = set(request_ids)
    out = Collected()
    consumer = await reader(bootstrap, topic)
    end = time.monotonic() + within_s
    done: set[str] = set()
    try:
        while done != wanted and time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, recs in batch.items():
                for rec in recs:
                    ev = codec.decode_record(rec)
                    assert rec.key == ev.request_id.encode()
                    out.events.setdefault(ev.request_id, []).append(ev)
                    out.partitions.setdefault(ev.request_id, set()).add(tp.partition)
                    if is_terminal(ev) and ev.request_id in wanted:
                        done.add(ev.request_id)
        # Linger briefly to catch duplicates that would arrive after the terminal.
        batch = await consumer.getmany(timeout_ms=300)
        for tp, recs in batch.items():
            for rec in recs:
                ev = codec.decode_record(rec)
                out.events.setdefault(ev.request_id, []).append(ev)
                out.partitions.setdefault(ev.request_id, set()).add(tp.partition)
    finally:
        await consumer.stop()
    missing = wanted - done
    assert not missing, f"{len(missing)} requests without terminal, e.g. {sorted(missing)[:3]}"
    return out


async def reference_text(addr: str, text: str, max_tokens: int) -> tuple[str, list[int]]:
    """The uninterrupted run of a prompt, straight from the model server."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = model_service_pb2_grpc.ModelServiceStub(ch)
        start = model_service_pb2.GenerateStart(
            request_id=f"ref-{uuid.uuid4().hex[:8]}",
            model=MODEL,
            prompt=common_pb2.Prompt(text=text),
            sampling=common_pb2.SamplingParams(temperature=0.0),
            max_tokens=max_tokens,
        )
        call = stub.Generate()
        await call.write(model_service_pb2.GenerateRequest(start=start))
        parts: list[str] = []
        ids: list[int] = []
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF or msg.WhichOneof("kind") == "finish":
                break
            parts.append(msg.delta.text)
            ids.extend(msg.delta.token_ids)
        call.cancel()
        return "".join(parts), ids


async def submit_streaming(
    topics: Topics, events: list[events_pb2.Event], within_s: float = 20.0
) -> None:
    """Produce the submits and wait until every one of them has a token in the log."""
    await produce(topics.bootstrap, topics.prompts, events)
    ids = [e.request_id for e in events]
    assert await wait_progress(topics.bootstrap, topics.tokens, ids, len(ids), within_s) == len(ids)


async def wait_progress(
    bootstrap: str, topic: str, request_ids: Iterable[str], at_least: int, within_s: float = 20.0
) -> int:
    """Wait until `at_least` of the requests have a token_delta in the log; returns how many."""
    wanted = set(request_ids)
    seen: set[str] = set()
    consumer = await reader(bootstrap, topic)
    end = time.monotonic() + within_s
    try:
        while len(seen) < at_least and time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=100)
            for recs in batch.values():
                for rec in recs:
                    if rec.key is None:
                        continue
                    key = rec.key.decode()
                    if key in wanted and dict(rec.headers).get("event-type") == b"token_delta":
                        seen.add(key)
    finally:
        await consumer.stop()
    return len(seen)


async def read_all(bootstrap: str, topic: str) -> list[events_pb2.Event]:
    """Every event currently in a topic."""
    consumer = await reader(bootstrap, topic)
    out: list[events_pb2.Event] = []
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while True:
            batch = await consumer.getmany(timeout_ms=300)
            out += [codec.decode_record(r) for recs in batch.values() for r in recs]
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= ends[tp] for tp in ends):
                return out
    finally:
        await consumer.stop()


async def wait_assigned(procs: list[Proc], partitions: int, within_s: float = 30.0) -> None:
    """Wait until the workers' latest logged assignments split `partitions` among all of them."""
    end = time.monotonic() + within_s
    while True:
        latest: list[list[int]] = []
        for p in procs:
            lines = [
                json.loads(line)
                for line in p.log_path.read_text(errors="replace").splitlines()
                if '"partitions assigned"' in line
            ]
            latest.append(lines[-1]["partitions"] if lines else [])
        flat = [x for parts in latest for x in parts]
        if all(latest) and sorted(flat) == list(range(partitions)):
            return
        if time.monotonic() > end:
            raise TimeoutError(f"workers not all assigned: {latest}")
        await asyncio.sleep(0.1)


def metrics_reader() -> tuple[InMemoryMetricReader, Any]:
    """A meter whose instruments can be read back (`counter_values`), for an in-process
    worker: `Worker(settings, meter=meter)`."""
    reader = InMemoryMetricReader()
    return reader, MeterProvider(metric_readers=[reader]).get_meter("test")


def counter_values(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], float]:
    """A counter's non-zero values by their sorted attribute pairs."""
    out: dict[tuple[Any, ...], float] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    if isinstance(point, NumberDataPoint) and point.value:
                        out[tuple(sorted((point.attributes or {}).items()))] = point.value
    return out
