"""Test support for the gateway (tests/integration/test_gateway_*.py): fresh topics, in-process
gateway replicas, a small fake worker on real Kafka, and a WebSocket client that collects
frames per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect

from gateway.server import Gateway as Gateway
from gateway.settings import Settings
from llmstream import codec, kafka, topics
from llmstream.v1 import common_pb2, events_pb2
from llmstream_tools import admin, stack

# Token texts cycle through content that must survive the JSON/WebSocket path unchanged.
TRICKY = ['"q"', "new\nline", "emoji 🦜", "\\back", "tab\t", "</script>", "ünï", "{json}"]


def token_text(request_id: str, seq: int, pad: int = 0) -> str:
    return f"{request_id[-6:]}:{seq}:{TRICKY[seq % len(TRICKY)]} " + "x" * pad


@dataclass
class Topics:
    bootstrap: str
    prompts: str
    tokens: str
    partitions: int
    # The model catalog the gateway follows: create_topics makes an empty one (nothing is
    # announced: every model is accepted); else the configured one.
    models: str = field(default_factory=topics.models)


async def new_tenant(tier: str = "standard") -> tuple[str, str, str]:
    """A new tenant of `tier` in the configured database and an API key of it:
    (tenant id, tenant name, key)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    tenant_id = await admin.create_tenant(name, tier)
    return tenant_id, name, (await admin.create_key(name)).key


async def new_key(tier: str = "standard") -> tuple[str, str]:
    """(tenant id, API key) of a new tenant of `tier`."""
    tenant_id, _name, key = await new_tenant(tier)
    return tenant_id, key


def topics_fixture(partitions: int) -> Any:
    """The `topics` fixture of a test module (`topics = testing.topics_fixture(4)`): fresh
    prompts and tokens topics of `partitions` partitions per test, deleted after it."""
    import pytest  # only test modules call this

    @pytest.fixture
    async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
        t = await create_topics(kafka_bootstrap, partitions)
        yield t
        await delete_topics(t)

    return topics


async def create_topics(bootstrap: str, partitions: int = 4) -> Topics:
    base = f"test.g{uuid.uuid4().hex[:10]}"
    t = Topics(bootstrap, f"{base}.prompts", f"{base}.tokens", partitions, f"{base}.models")
    await stack.create_topics(bootstrap, {t.prompts: partitions, t.tokens: partitions, t.models: 1})
    return t


async def delete_topics(t: Topics) -> None:
    """The topics `create_topics` made."""
    await stack.delete_topics(t.bootstrap, [t.prompts, t.tokens, t.models])


def settings(
    t: Topics, redis_url: str, database_url: str, gateway_id: str, partitions: list[int], **kw: Any
) -> Settings:
    return Settings(
        gateway_id=gateway_id,
        host="127.0.0.1",
        port=0,
        bootstrap=t.bootstrap,
        prompts_topic=t.prompts,
        tokens_topic=t.tokens,
        models_topic=t.models,
        partitions=partitions,
        redis_url=redis_url,
        database_url=database_url,
        auth_cache_s=0.2,
        **kw,
    )


@contextlib.asynccontextmanager
async def running(s: Settings, **kw: Any) -> AsyncIterator[Gateway]:
    """A started gateway (`kw`: Gateway's, e.g. `route_providers`), stopped after."""
    gw = Gateway(s, **kw)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


class FakeWorker:
    """Consumes the prompts topic; for each submit produces `started`, `max_tokens` deltas
    (`token_text`) every `itl_s` seconds and `completed` to the request's reply partition;
    a cancel ends a running request with finish reason cancelled."""

    def __init__(self, t: Topics, itl_s: float = 0.0, batch: int = 1, pad: int = 0) -> None:
        self.t = t
        self.pad = pad
        self.itl_s = itl_s
        self.batch = batch
        self.submitted: dict[str, events_pb2.Event] = {}
        self.cancels: dict[str, str] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.producer = AIOKafkaProducer(
            **kafka.Connection(t.bootstrap).client_kwargs("test-gateway-harness"),
            enable_idempotence=True,
            acks="all",
            linger_ms=1,
        )
        self.consumer = AIOKafkaConsumer(
            t.prompts,
            **kafka.Connection(t.bootstrap).client_kwargs("test-gateway-harness"),
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=10,
        )

    async def __aenter__(self) -> FakeWorker:
        await self.producer.start()
        await self.consumer.start()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        for r in self._runs.values():
            r.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self.consumer.stop()
        await self.producer.stop()

    async def _loop(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for rec in records:
                    ev = codec.decode_record(rec)
                    if ev.HasField("submitted"):
                        self.submitted[ev.request_id] = ev
                        self._runs[ev.request_id] = asyncio.create_task(self._run(ev))
                    elif ev.HasField("cancel_requested"):
                        self.cancels[ev.request_id] = ev.cancel_requested.reason

    async def _send(self, ev: events_pb2.Event, partition: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = await self.producer.send(
            self.t.tokens,
            codec.encode(ev),
            key=codec.key(ev),
            headers=codec.headers(ev),
            partition=partition,
        )
        return fut

    async def _run(self, submit: events_pb2.Event) -> None:
        rid, tenant = submit.request_id, submit.tenant_id
        part = submit.submitted.reply.partition
        n = submit.submitted.max_tokens

        def new() -> events_pb2.Event:
            return codec.new_event(rid, tenant, "fake-worker")

        ev = new()
        ev.started.worker_id = "fake"
        ev.started.attempt = 1
        await self._send(ev, part)
        seq = 0
        reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_LENGTH
        futs = []
        while seq < n:
            if rid in self.cancels:
                reason = common_pb2.FINISH_REASON_CANCELLED
                break
            if self.itl_s:
                await asyncio.sleep(self.itl_s)
            for _ in range(min(self.batch, n - seq)):
                seq += 1
                ev = new()
                ev.token_delta.seq = seq
                ev.token_delta.text = token_text(rid, seq, self.pad)
                ev.token_delta.token_ids.append(seq)
                futs.append(await self._send(ev, part))
        ev = new()
        ev.completed.finish_reason = reason
        ev.completed.usage.prompt_tokens = submit.submitted.estimated_prompt_tokens
        ev.completed.usage.completion_tokens = seq
        ev.completed.last_seq = seq
        if reason == common_pb2.FINISH_REASON_CANCELLED:
            ev.completed.message = self.cancels.get(rid, "")
        futs.append(await self._send(ev, part))
        await asyncio.gather(*futs)


@dataclass
class Stream:
    request_id: str
    tokens: list[tuple[int, str]] = field(default_factory=list)
    done: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.tokens)


class Client:
    """A WebSocket client that sorts frames by request id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.streams: dict[str, Stream] = {}
        self.by_ref: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.hello: dict[str, Any] | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, key: str | None = None, **kw: Any) -> Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        ws = await connect(
            f"ws://127.0.0.1:{port}/ws",
            additional_headers=headers,
            compression=None,
            max_size=None,
            **kw,
        )
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                f = json.loads(raw)
                self.frames.append(f)
                kind = f.get("type")
                rid = f.get("request_id")
                if kind == "hello":
                    self.hello = f
                elif kind == "accepted":
                    self.streams.setdefault(rid, Stream(rid))
                elif kind == "token":
                    self.streams.setdefault(rid, Stream(rid)).tokens.append((f["seq"], f["text"]))
                elif kind == "tokens":  # texts[i] has seq `seq - len(texts) + 1 + i`
                    first = f["seq"] - len(f["texts"]) + 1
                    self.streams.setdefault(rid, Stream(rid)).tokens.extend(
                        enumerate(f["texts"], first)
                    )
                elif kind == "done":
                    self.streams.setdefault(rid, Stream(rid)).done = f
                elif kind == "error":
                    self.errors.append(f)
                if "client_ref" in f:
                    self.by_ref[f["client_ref"]] = f
                self._changed.set()
        except Exception:
            pass
        finally:
            self.close_code = self.ws.close_code
            self._changed.set()

    async def send(self, obj: dict[str, Any] | str) -> None:
        await self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    async def submit(self, ref: str, max_tokens: int = 5, **kw: Any) -> None:
        frame = {
            "type": "submit",
            "client_ref": ref,
            "model": "synthetic",
            "prompt": f"prompt {ref}",
            "max_tokens": max_tokens,
            **kw,
        }
        await self.send(frame)

    async def wait(self, cond: Any, within: float = 10.0) -> None:
        end = time.monotonic() + within
        while not cond():
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("condition not met; last frames: " + repr(self.frames[-5:]))
            self._changed.clear()
            if cond():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_ref(self, ref: str, within: float = 10.0) -> dict[str, Any]:
        await self.wait(lambda: ref in self.by_ref, within)
        return self.by_ref[ref]

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(BaseException):
            await self._reader
