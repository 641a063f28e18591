"""Helpers for tests and benchmarks: an in-process server and a Generate client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from model_server.admin import AdminTokens
from model_server.metrics import ServerMetrics
from model_server.registry import EngineFactory, ModelSpec, default_factory
from model_server.server import ModelServer, Settings
from model_server.types import ModelLimits

# The admin token of `running_server(..., admin=True)` (tests only).
ADMIN_TOKEN = "test-admin-token-0123456789"


def admin_settings(token: str = ADMIN_TOKEN, **extra: Any) -> dict[str, Any]:
    """`running_server` keywords that serve the admin RPC on a free loopback port."""
    return {"admin": True, "admin_port": 0, "admin_tokens": AdminTokens(value=token), **extra}


def bearer(token: str = ADMIN_TOKEN) -> tuple[tuple[str, str]]:
    """gRPC call metadata carrying an admin token."""
    return (("authorization", f"Bearer {token}"),)


@contextlib.asynccontextmanager
async def admin_channel(server: ModelServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the server's admin port (admin must be on)."""
    assert server.admin_port, "the admin RPC is off"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.admin_port}")
    try:
        yield channel
    finally:
        await channel.close()


def synthetic_spec(
    name: str = "synthetic",
    *,
    ttft_ms: float = 2.0,
    itl_ms: float = 1.0,
    options: dict[str, Any] | None = None,
    **limits: Any,
) -> ModelSpec:
    opts: dict[str, Any] = {"ttft_ms": ttft_ms, "itl_ms": itl_ms}
    opts.update(options or {})
    base = ModelLimits(max_concurrency=64, max_queue=64, queue_timeout_s=10.0)
    return ModelSpec(
        name=name,
        engine="synthetic",
        limits=dataclasses.replace(base, **limits),
        options=opts,
    )


def start(
    model: str,
    *,
    text: str | None = None,
    chat: Sequence[tuple[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    request_id: str = "req-1",
    max_tokens: int = 16,
    temperature: float | None = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    continuation: Sequence[int] = (),
    priority: int = 0,
    logprobs: int = 0,
    top_p: float | None = None,
    top_k: int = 0,
) -> model_service_pb2.GenerateStart:
    if chat is not None:
        prompt = common_pb2.Prompt(
            chat=common_pb2.ChatPrompt(
                messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in chat]
            )
        )
    elif token_ids is not None:
        prompt = common_pb2.Prompt(tokens=common_pb2.PromptTokens(ids=list(token_ids)))
    else:
        prompt = common_pb2.Prompt(text=text if text is not None else "Hello")
    sampling = common_pb2.SamplingParams(stop=list(stop), logprobs=logprobs, top_k=top_k)
    if temperature is not None:
        sampling.temperature = temperature
    if seed is not None:
        sampling.seed = seed
    if top_p is not None:
        sampling.top_p = top_p
    return model_service_pb2.GenerateStart(
        request_id=request_id,
        model=model,
        prompt=prompt,
        sampling=sampling,
        max_tokens=max_tokens,
        priority=priority,
        continuation_token_ids=list(continuation),
    )


@dataclass
class StreamResult:
    deltas: list[model_service_pb2.GenerateDelta] = field(default_factory=list)
    finishes: list[model_service_pb2.GenerateFinish] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    # Monotonic arrival time of each delta at the client.
    arrivals: list[float] = field(default_factory=list)

    @property
    def finish(self) -> model_service_pb2.GenerateFinish:
        assert len(self.finishes) == 1, f"expected one finish, got {len(self.finishes)}"
        return self.finishes[0]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]


async def generate(
    stub: model_service_pb2_grpc.ModelServiceStub,
    start_msg: model_service_pb2.GenerateStart,
    *,
    cancel_after_deltas: int | None = None,
    cancel_reason: str = "client",
    rpc_cancel_after_deltas: int | None = None,
    deadline_s: float = 30.0,
    half_close: bool = True,
) -> StreamResult:
    """Run one Generate stream; optionally send `cancel` (or cancel the RPC) after N deltas."""
    loop = asyncio.get_running_loop()
    call = stub.Generate(timeout=deadline_s)
    await call.write(model_service_pb2.GenerateRequest(start=start_msg))
    if half_close and cancel_after_deltas is None:
        await call.done_writing()
    result = StreamResult()
    try:
        async for msg in call:
            if msg.HasField("delta"):
                result.deltas.append(msg.delta)
                result.arrivals.append(loop.time())
                n = len(result.deltas)
                if cancel_after_deltas is not None and n == cancel_after_deltas:
                    await call.write(
                        model_service_pb2.GenerateRequest(
                            cancel=model_service_pb2.GenerateCancel(reason=cancel_reason)
                        )
                    )
                    await call.done_writing()
                if rpc_cancel_after_deltas is not None and n == rpc_cancel_after_deltas:
                    call.cancel()
                    result.code = grpc.StatusCode.CANCELLED
                    return result
            else:
                result.finishes.append(msg.finish)
        result.code = await call.code()
        result.details = await call.details() or ""
    except grpc.aio.AioRpcError as err:
        result.code = err.code()
        result.details = err.details() or ""
    return result


async def eventually(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    """Wait until ``condition()`` holds; AssertionError after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    for _ in itertools.count():
        if condition():
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached within {within_s}s")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running_server(
    models: Sequence[ModelSpec],
    *,
    engine_factory: EngineFactory = default_factory,
    metrics: ServerMetrics | None = None,
    load: bool = True,
    **config: Any,
) -> AsyncIterator[tuple[ModelServer, grpc.aio.Channel]]:
    """A server on a free loopback port and a channel to it."""
    cfg = Settings(host="127.0.0.1", port=0, models=list(models), **config)
    server = ModelServer(cfg, metrics=metrics, engine_factory=engine_factory)
    await server.start()
    try:
        if load:
            await server.load_models()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}",
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        try:
            yield server, channel
        finally:
            await channel.close()
    finally:
        await server.stop(0)
