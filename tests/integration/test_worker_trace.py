"""Trace context of a prompt continues into the gRPC call and the token events: an in-process worker against a
recording ModelService (a stand-in that streams two deltas) on real Kafka."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.testing.worker import (
    Topics,
    collect,
    counter_values,
    metrics_reader,
    produce,
    submit_event,
)
from llmstream_tools.testing.worker_fixtures import worker_topics
from worker.service import Worker
from worker.settings import Settings

pytestmark = pytest.mark.integration
# Fixtures of llmstream_tools.testing.worker_fixtures, under the names the tests use.
topics = worker_topics


class Recorder(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.starts: list[model_service_pb2.GenerateStart] = []

    async def Generate(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[model_service_pb2.GenerateResponse]:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        first = await anext(aiter(request_iterator))
        self.starts.append(first.start)
        for seq, (text, tid) in enumerate((("hel", 1), ("lo", 2)), start=1):
            yield model_service_pb2.GenerateResponse(
                delta=model_service_pb2.GenerateDelta(seq=seq, text=text, token_ids=[tid])
            )
        yield model_service_pb2.GenerateResponse(
            finish=model_service_pb2.GenerateFinish(
                finish_reason=common_pb2.FINISH_REASON_STOP,
                usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=2),
                last_seq=2,
            )
        )

    async def ListModels(
        self, request: model_service_pb2.ListModelsRequest, context: Any
    ) -> model_service_pb2.ListModelsResponse:
        return model_service_pb2.ListModelsResponse(
            models=[model_service_pb2.ModelInfo(name="synthetic", version="rec-7")]
        )

    async def Tokenize(
        self, request: model_service_pb2.TokenizeRequest, context: Any
    ) -> model_service_pb2.TokenizeResponse:
        return model_service_pb2.TokenizeResponse()

    async def WatchWorkers(  # type: ignore[override]  # writes with context.write(), as ours
        self, request_iterator: Any, context: Any
    ) -> None:
        """A model server that never reports a lost worker: the watch stays open until the
        worker ends it."""
        await context.send_initial_metadata(())
        async for _ in request_iterator:
            pass


def parse(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, flags) == ("00", "01")
    return trace_id, span_id


async def test_traceparent_reaches_grpc_metadata_and_events(
    topics: Topics, spans: InMemorySpanExporter
) -> None:
    recorder = Recorder()
    server = grpc.aio.server()
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reader, meter = metrics_reader()
    worker = Worker(
        Settings(
            bootstrap=topics.bootstrap,
            prompts_topic=topics.prompts,
            tokens_topic=topics.tokens,
            dlq_topic=topics.dlq,
            group=topics.group,
            worker_id="w-trace",
            model_servers=[f"127.0.0.1:{port}"],
            session_timeout_ms=6000,
        ),
        meter=meter,
    )
    task = asyncio.create_task(worker.run())
    try:
        rid = f"r-{uuid.uuid4().hex[:12]}"
        submit = submit_event(rid, "hi", 10, topics.tokens, 1)
        submit.trace.tracestate = "vendor=1"
        await produce(topics.bootstrap, topics.prompts, [submit])
        got = await collect(topics.bootstrap, topics.tokens, [rid], within_s=20)
        st = got.check_contract(rid)
        assert st.text == "hello" and st.finish_reason == "stop"
        assert st.model_version == "rec-7" and st.model_server == f"127.0.0.1:{port}"
        assert recorder.metadata[0]["x-llmstream-worker"] == "w-trace"
        assert recorder.starts[0].request_id == rid and recorder.starts[0].max_tokens == 10
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await server.stop(0)
    assert counter_values(reader, "llmstream_worker_requests") == {(("outcome", "stop"),): 1}

    finished = {s.name: s for s in spans.get_finished_spans()}
    process = finished[f"process {topics.prompts}"]
    client = finished["llmstream.v1.ModelService/Generate"]
    produce_span = finished[f"send {topics.tokens}"]
    trace_id, gateway_span = parse(submit.trace.traceparent)
    # The worker continues the prompt's trace: its span's parent is the one in the event.
    assert f"{process.context.trace_id:032x}" == trace_id
    assert process.parent is not None and f"{process.parent.span_id:016x}" == gateway_span
    assert client.parent is not None and client.parent.span_id == process.context.span_id
    assert produce_span.parent is not None
    assert produce_span.parent.span_id == process.context.span_id
    # gRPC metadata carries the client span; `started` and the terminal event carry the
    # produce span (compact token deltas carry no trace, docs/events.md); the vendor's
    # tracestate travels along both.
    assert parse(recorder.metadata[0]["traceparent"]) == (
        trace_id,
        f"{client.context.span_id:016x}",
    )
    assert recorder.metadata[0]["tracestate"] == "vendor=1"
    traced = [ev for ev in got.events[rid] if not ev.HasField("token_delta")]
    assert [ev.WhichOneof("body") for ev in traced] == ["started", "completed"]
    for ev in traced:
        assert parse(ev.trace.traceparent) == (trace_id, f"{produce_span.context.span_id:016x}")
        assert ev.trace.tracestate == "vendor=1"
    deltas = [ev for ev in got.events[rid] if ev.HasField("token_delta")]
    assert len(deltas) >= 1 and not any(ev.HasField("trace") for ev in deltas)
    assert [e.name for e in produce_span.events] == ["first_token", "finish"]
