"""The model server's span per Generate call (real gRPC on loopback, synthetic engine): it
continues the caller's trace from gRPC metadata and records the call's status."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llmstream.v1 import model_service_pb2, model_service_pb2_grpc
from llmstream_tools.testing.model_server import running_server, start, synthetic_spec

pytestmark = pytest.mark.integration


async def call(
    stub: model_service_pb2_grpc.ModelServiceStub,
    first: model_service_pb2.GenerateRequest,
    metadata: tuple[tuple[str, str], ...],
) -> grpc.StatusCode:
    rpc = stub.Generate(metadata=metadata)
    await rpc.write(first)
    await rpc.done_writing()
    async for _ in rpc:
        pass
    return await rpc.code()


async def test_generate_span_continues_the_callers_trace_and_records_status(
    spans: InMemorySpanExporter,
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
    async with running_server([synthetic_spec("synthetic", ttft_ms=1, itl_ms=0.1)]) as (
        _srv,
        channel,
    ):
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        ok = model_service_pb2.GenerateRequest(start=start("synthetic", text="hi", max_tokens=5))
        assert await call(stub, ok, metadata) == grpc.StatusCode.OK
        bad = model_service_pb2.GenerateRequest(start=start("no-such-model", text="hi"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(stub, bad, ())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    served, refused = spans.get_finished_spans()
    assert served.name == refused.name == "llmstream.v1.ModelService/Generate"
    assert served.kind is SpanKind.SERVER
    assert f"{served.context.trace_id:032x}" == trace_id
    assert served.parent is not None and f"{served.parent.span_id:016x}" == parent_id
    assert served.attributes is not None and served.attributes["rpc.grpc.status_code"] == 0
    assert [e.name for e in served.events] == ["first_token", "finish"]
    assert served.events[1].attributes is not None
    assert served.events[1].attributes["llmstream.completion_tokens"] == 5
    # No traceparent: a new trace; a refused call is an error span with the gRPC code.
    assert refused.parent is None
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes is not None
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
