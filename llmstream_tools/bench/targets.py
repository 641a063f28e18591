"""Targets of the load generator (llmstream_tools/bench/loadgen.py): one interface, so a scenario
runs the same load against each, back to back.

- `GatewayTarget`: WebSockets to a gateway (protocol v1, docs/protocol.md): the whole pipeline;
- `DirectTarget`: gRPC `Generate` streams straight to a model server (no Kafka, no gateway);
- `OpenAITarget` (llmstream_tools/bench/openai_target.py): streamed completions of an
  OpenAI-compatible HTTP server.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.bench.loadgen import REQUEST_TIMEOUT_S, Sample


class Target(abc.ABC):
    label: str

    @abc.abstractmethod
    async def open(self, clients: int) -> None:
        """Connect for `clients` concurrent clients (before any clock starts)."""

    @abc.abstractmethod
    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        """One request on behalf of `client`; never raises (errors go into the sample)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Target:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(slots=True)
class _Pending:
    sample: Sample
    done: asyncio.Future[None]


class _Socket:
    """One WebSocket; a reader task times frames as they arrive and sorts them by request."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.by_ref: dict[str, _Pending] = {}
        self.by_id: dict[str, _Pending] = {}
        self.refs = itertools.count()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        clock = time.perf_counter
        try:
            async for raw in self.ws:
                now = clock()
                f = json.loads(raw)
                kind = f.get("type")
                if kind == "token" or kind == "tokens":  # `tokens`: several in one frame
                    p = self.by_id.get(f["request_id"])
                    if p is not None:
                        p.sample.message(now)
                elif kind == "accepted":
                    p = self.by_ref.pop(f.get("client_ref", ""), None)
                    if p is not None:
                        self.by_id[f["request_id"]] = p
                elif kind == "done":
                    p = self.by_id.pop(f["request_id"], None)
                    if p is not None:
                        p.sample.end = now
                        p.sample.tokens = int(f.get("usage", {}).get("completion_tokens", 0))
                        if f.get("finish_reason") == "error":
                            p.sample.error = str(f.get("error_code") or "error")
                        _resolve(p)
                elif kind == "error":
                    p = self.by_ref.pop(f.get("client_ref") or "", None) or self.by_id.pop(
                        f.get("request_id") or "", None
                    )
                    if p is not None:
                        p.sample.error = str(f.get("code", "error"))
                        _resolve(p)
        except ConnectionClosed:
            pass
        finally:
            for p in [*self.by_ref.values(), *self.by_id.values()]:
                p.sample.error = p.sample.error or f"socket closed ({self.ws.close_code})"
                _resolve(p)
            self.by_ref.clear()
            self.by_id.clear()

    async def submit(self, frame: dict[str, Any], at: float | None) -> Sample:
        ref = f"r{next(self.refs)}"
        p = _Pending(Sample(), asyncio.get_running_loop().create_future())
        self.by_ref[ref] = p
        data = json.dumps({**frame, "client_ref": ref})
        p.sample.sent = at if at is not None else time.perf_counter()
        try:
            await self.ws.send(data)
            await asyncio.wait_for(asyncio.shield(p.done), REQUEST_TIMEOUT_S)
        except TimeoutError:
            p.sample.error = "client timeout"
        except ConnectionClosed:
            p.sample.error = p.sample.error or "socket closed"
        return p.sample


def _resolve(p: _Pending) -> None:
    if not p.done.done():
        p.done.set_result(None)


class GatewayTarget(Target):
    """The whole pipeline: one WebSocket per client (open loop: requests share the sockets)."""

    def __init__(
        self,
        port: int,
        key: str,
        model: str = "synthetic",
        *,
        host: str = "127.0.0.1",
        temperature: float = 0.0,
        connect_concurrency: int = 32,
        label: str = "pipeline",
    ) -> None:
        self.url = f"ws://{host}:{port}/ws"
        self.key, self.model, self.temperature = key, model, temperature
        self.connect_concurrency = connect_concurrency
        self.label = label
        self.sockets: list[_Socket] = []

    async def open(self, clients: int) -> None:
        slots = asyncio.Semaphore(self.connect_concurrency)

        async def one() -> _Socket:
            async with slots:
                return _Socket(await self._connect())

        got = await asyncio.gather(*(one() for _ in range(clients)), return_exceptions=True)
        self.sockets = [s for s in got if isinstance(s, _Socket)]
        failed = [e for e in got if not isinstance(e, _Socket)]
        if failed:  # the open ones stay in `sockets` (close() closes them)
            raise ConnectionError(f"{len(failed)} of {clients} sockets failed: {failed[0]!r}")

    async def _connect(self) -> ClientConnection:
        """Connect and read `hello`; a refused upgrade (overloaded: 429/5xx) is retried."""
        delay = 0.1
        for attempt in range(10):
            try:
                ws = await connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.key}"},
                    compression=None,
                    max_size=None,
                    open_timeout=60,
                    ping_interval=None,
                )
            except InvalidStatus as exc:
                if exc.response.status_code < 429 or attempt == 9:
                    raise
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            hello = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if hello.get("type") != "hello":
                raise RuntimeError(f"expected hello, got {hello}")
            if "tokens" in hello.get("capabilities", []):
                # Take what accumulated for a request in one frame (docs/protocol.md).
                await ws.send(json.dumps({"type": "hello", "capabilities": ["tokens"]}))
            return ws
        raise AssertionError("unreachable")

    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        frame = {
            "type": "submit",
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        return await self.sockets[client % len(self.sockets)].submit(frame, at)

    async def close(self) -> None:
        sockets, self.sockets = self.sockets, []
        await asyncio.gather(*(s.ws.close() for s in sockets), return_exceptions=True)
        for s in sockets:
            s.reader.cancel()


class DirectTarget(Target):
    """gRPC `Generate` streams straight to a model server, a channel per `per_channel` clients."""

    def __init__(
        self,
        address: str,
        model: str = "synthetic",
        *,
        temperature: float = 0.0,
        per_channel: int = 250,
        label: str = "direct",
    ) -> None:
        self.address, self.model, self.temperature = address, model, temperature
        self.per_channel = per_channel
        self.label = label
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[model_service_pb2_grpc.ModelServiceStub] = []

    async def open(self, clients: int) -> None:
        n = max(1, math.ceil(clients / self.per_channel))
        self.channels = [grpc.aio.insecure_channel(self.address) for _ in range(n)]
        for ch in self.channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        self.stubs = [model_service_pb2_grpc.ModelServiceStub(ch) for ch in self.channels]

    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        clock = time.perf_counter
        sample = Sample()
        start = model_service_pb2.GenerateStart(
            request_id=uuid.uuid4().hex,
            model=self.model,
            prompt=common_pb2.Prompt(text=prompt),
            sampling=common_pb2.SamplingParams(temperature=self.temperature),
            max_tokens=max_tokens,
        )
        sample.sent = at if at is not None else clock()
        call = self.stubs[client % len(self.stubs)].Generate(timeout=REQUEST_TIMEOUT_S)
        try:
            await call.write(model_service_pb2.GenerateRequest(start=start))
            await call.done_writing()
            async for msg in call:
                if msg.HasField("delta"):
                    sample.message(clock())
                    sample.tokens += len(msg.delta.token_ids)
                elif msg.HasField("finish"):
                    sample.end = clock()
                    if msg.finish.finish_reason == common_pb2.FINISH_REASON_ERROR:
                        sample.error = "error"
        except grpc.aio.AioRpcError as err:
            sample.error = err.code().name
        return sample

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        self.channels, self.stubs = [], []
