"""Loading, health, drain, SIGTERM, hot swap and metrics of the model server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from llmstream.ports import free_port
from llmstream.v1 import (
    common_pb2,
    model_admin_pb2,
    model_admin_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
)
from llmstream_tools.testing.model_server import (
    admin_channel,
    admin_settings,
    bearer,
    eventually,
    generate,
    running_server,
    start,
    synthetic_spec,
)
from model_server.admin_options import AdminPolicy
from model_server.engine import Engine
from model_server.engines.synthetic import SyntheticEngine
from model_server.metrics import ServerMetrics
from model_server.registry import ModelSpec, ModelState, default_factory
from model_server.types import ModelLimits

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(resp.status)


class GatedEngine(SyntheticEngine):
    """A synthetic engine whose load() waits for a gate (a model that loads slowly)."""

    gate: asyncio.Event

    def __init__(self, options: Mapping[str, Any], limits: ModelLimits) -> None:
        super().__init__(options, limits)

    async def load(self) -> None:
        await self.gate.wait()
        await super().load()


async def test_health_is_not_serving_while_the_model_loads() -> None:
    gate = asyncio.Event()

    def factory(spec: ModelSpec) -> Engine:
        eng = GatedEngine(spec.options, spec.limits)
        eng.gate = gate
        return eng

    async with running_server([synthetic_spec("m")], engine_factory=factory, load=False) as (
        srv,
        channel,
    ):
        loading = asyncio.create_task(srv.load_models())
        await asyncio.sleep(0.05)
        assert await health_status(channel) == NOT_SERVING
        assert await health_status(channel, "llmstream.v1.ModelService") == NOT_SERVING
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        res = await generate(stub, start("m"))
        assert res.code == grpc.StatusCode.UNAVAILABLE
        assert "loading" in res.details
        gate.set()
        await loading
        for _ in range(200):
            if await health_status(channel) == SERVING:
                break
            await asyncio.sleep(0.01)
        assert await health_status(channel) == SERVING
        assert (await generate(stub, start("m"))).code == grpc.StatusCode.OK


async def test_drain_finishes_short_streams_and_cancels_long_ones() -> None:
    async with running_server([synthetic_spec("slow", itl_ms=20)]) as (srv, channel):
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        short = asyncio.create_task(generate(stub, start("slow", request_id="s", max_tokens=10)))
        long = asyncio.create_task(generate(stub, start("slow", request_id="l", max_tokens=1000)))
        handle = srv.registry.get("slow")
        await eventually(lambda: handle.in_flight >= 2)
        t0 = time.monotonic()
        drain = asyncio.create_task(srv.drain(timeout_s=0.6))
        await asyncio.sleep(0.02)
        assert await health_status(channel) == NOT_SERVING
        refused = await generate(stub, start("slow", request_id="new"))
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        assert "draining" in refused.details
        s, lg = await short, await long
        assert s.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(s.token_ids) == 10
        assert lg.code == grpc.StatusCode.OK
        assert lg.finish.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert lg.finish.message == "shutdown"
        assert lg.finish.usage.completion_tokens == len(lg.token_ids) > 0
        assert await drain == 1
        assert 0.55 < time.monotonic() - t0 < 6.0
        assert srv.registry.get("slow").engine.active_requests() == frozenset()


async def test_sigterm_drains_a_real_process() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmstream_tools.cli",
        "model-server",
        "--engine=synthetic",
        f"--port={port}",
        "--metrics-port=0",
        "--synthetic-itl-ms=20",
        "--drain-timeout-s=0.8",
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        seen = "no answer"
        while True:
            try:
                if await health_status(channel) == SERVING:
                    break
                seen = "NOT_SERVING"
            except grpc.aio.AioRpcError as exc:
                seen = exc.code().name  # not listening yet
            assert time.monotonic() < deadline, f"server did not become SERVING ({seen})"
            await asyncio.sleep(0.05)
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        long = asyncio.create_task(generate(stub, start("synthetic", max_tokens=1000)))
        await asyncio.sleep(0.2)
        assert not long.done(), long.result()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        assert await health_status(channel) == NOT_SERVING
        refused = await generate(stub, start("synthetic", request_id="late"))
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        res = await long
        assert res.finish.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert res.finish.message == "shutdown"
        assert len(res.token_ids) > 10
        rc = await asyncio.wait_for(proc.wait(), 10)
        assert rc == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "SIGTERM: draining" in log
        assert "cancelled 1 streams" in log
    finally:
        await channel.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_hot_swap_and_unload_via_admin_rpc(tmp_path: Path) -> None:
    v1 = ModelSpec(
        name="m",
        engine="synthetic",
        version="v1",
        limits=ModelLimits(max_concurrency=8),
        options={"ttft_ms": 1, "itl_ms": 10},
    )
    policy = AdminPolicy(model_dirs=(tmp_path,))
    async with (
        running_server([v1], **admin_settings(admin_policy=policy)) as (srv, channel),
        admin_channel(srv) as admin_ch,
    ):
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        admin = model_admin_pb2_grpc.ModelAdminServiceStub(admin_ch)
        auth = bearer()
        old = srv.registry.get("m")
        first = asyncio.create_task(generate(stub, start("m", request_id="old", max_tokens=40)))
        await eventually(lambda: old.in_flight >= 1)
        options = struct_pb2.Struct()
        options.update({"ttft_ms": 1, "itl_ms": 1})
        resp = await admin.LoadModel(
            model_admin_pb2.LoadModelRequest(
                name="m",
                engine="synthetic",
                version="v2",
                options=options,
                limits=model_admin_pb2.ModelLimits(max_concurrency=3),
            ),
            metadata=auth,
        )
        assert resp.model.version == "v2"
        assert resp.model.max_concurrency == 3
        assert resp.replaced_version == "v1"
        listed = await stub.ListModels(model_service_pb2.ListModelsRequest())
        assert [(m.name, m.version) for m in listed.models] == [("m", "v2")]
        new = srv.registry.get("m")
        assert new is not old and old.state is ModelState.RETIRING
        second = await generate(stub, start("m", request_id="new", max_tokens=40))
        assert second.code == grpc.StatusCode.OK
        assert isinstance(new.engine, SyntheticEngine) and isinstance(old.engine, SyntheticEngine)
        assert new.engine.tokens_produced == 40
        r1 = await first
        assert r1.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(r1.token_ids) == 40  # the old version finished its stream
        assert r1.token_ids == second.token_ids  # same synthetic "weights"
        await eventually(lambda: old.state is ModelState.CLOSED)

        # Unload: an in-flight stream gets the drain timeout, then is cancelled.
        third = asyncio.create_task(generate(stub, start("m", request_id="u", max_tokens=1000)))
        await eventually(lambda: new.in_flight >= 1)
        un = await admin.UnloadModel(
            model_admin_pb2.UnloadModelRequest(name="m", drain_timeout_ms=100), metadata=auth
        )
        assert un.cancelled_streams == 1
        r3 = await third
        assert r3.finish.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert r3.finish.message == "model unloaded"
        assert (await generate(stub, start("m"))).code == grpc.StatusCode.NOT_FOUND
        assert await health_status(channel) == NOT_SERVING  # nothing left to serve

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.LoadModel(
                model_admin_pb2.LoadModelRequest(name="x", engine="gpt5"), metadata=auth
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = struct_pb2.Struct()
        # Inside the allowed directory, so past the allow-list, but not there: the load fails.
        bad.update({"model_path": str(tmp_path / "missing.gguf"), "instances": 1})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.LoadModel(
                model_admin_pb2.LoadModelRequest(name="x", engine="llamacpp", options=bad),
                metadata=auth,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "x" not in {
            m.name for m in (await stub.ListModels(model_service_pb2.ListModelsRequest())).models
        }


async def test_metrics_follow_vllm_names_and_intervals() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = ServerMetrics(provider.get_meter("test"))
    async with running_server(
        [synthetic_spec("m", ttft_ms=30, itl_ms=5)], metrics=metrics, engine_factory=default_factory
    ) as (_srv, channel):
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        res = await generate(stub, start("m", max_tokens=11))
        assert res.code == grpc.StatusCode.OK
        rejected = await generate(stub, start("m", temperature=5.0))
        assert rejected.code == grpc.StatusCode.INVALID_ARGUMENT
        # A model name the client made up is not a label value of its own.
        unknown = await generate(stub, start("made-up-model-1", max_tokens=1))
        assert unknown.code == grpc.StatusCode.NOT_FOUND
        data = reader.get_metrics_data()
    points: dict[str, Any] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points[metric.name] = list(metric.data.data_points)
    ttft = points["llmstream_time_to_first_token_seconds"][0]
    assert ttft.count == 1 and 0.03 <= ttft.sum < 2.0
    assert ttft.attributes == {"model_name": "m"}
    itl = points["llmstream_inter_token_latency_seconds"][0]
    assert itl.count == 10  # 11 tokens, 10 gaps
    assert 0.02 < itl.sum < 2.0  # nominally 10 x 5 ms
    e2e = points["llmstream_e2e_request_latency_seconds"][0]
    assert e2e.sum > ttft.sum
    assert points["llmstream_generation_tokens"][0].value == 11
    success = points["llmstream_request_success"][0]
    assert success.attributes["finished_reason"] == "length" and success.value == 1
    rejections = {
        (p.attributes["code"], p.attributes["model_name"]): p.value
        for p in points["llmstream_requests_rejected"]
    }
    assert rejections == {("INVALID_ARGUMENT", "m"): 1, ("NOT_FOUND", "other"): 1}
    for name in (
        "llmstream_request_queue_time_seconds",
        "llmstream_request_prefill_time_seconds",
        "llmstream_request_decode_time_seconds",
        "llmstream_num_requests_running",
        "llmstream_num_requests_waiting",
    ):
        assert name in points
