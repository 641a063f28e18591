"""One request through the real pipeline (gateway, Kafka, worker, gRPC, model server,
aggregator as separate processes) is one trace: every service's spans share the trace id
and are parented hop by hop. Each process exports its spans as JSON lines
(LLMSTREAM_TRACES_FILE), which is how this test collects them across processes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from llmstream_tools.stack import local_stack

pytestmark = pytest.mark.integration


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def one_request(port: int, key: str, prompt: str) -> tuple[str, list[dict[str, Any]]]:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {key}"},
        open_timeout=20,
    ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 20))
        assert hello["type"] == "hello"
        await ws.send(
            json.dumps({"type": "submit", "model": "synthetic", "prompt": prompt, "max_tokens": 8})
        )
        frames: list[dict[str, Any]] = []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert frame["type"] != "error", frame
            frames.append(frame)
            if frame["type"] == "done":
                return frame["request_id"], frames


def by_name(spans: list[dict[str, Any]], service: str, name: str) -> dict[str, Any]:
    found = [s for s in spans if s["service"] == service and s["name"] == name]
    assert len(found) == 1, (service, name, [(s["service"], s["name"]) for s in spans])
    return found[0]


def event_names(span: dict[str, Any]) -> list[str]:
    return [e["name"] for e in span["events"]]


async def test_one_request_is_one_trace_parented_across_all_four_services(
    tmp_path: Path,
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    extra = {
        "LLMSTREAM_TRACES_FILE": str(spans_file),
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
        "OTEL_TRACES_EXPORTER": "none",
    }
    async with local_stack(tmp_path, workers=1, partitions=2, extra_env=extra) as stack:
        _, key = await stack.tenant_key("standard")
        request_id, frames = await one_request(stack.gateway_port, key, "trace me")
        assert any(f["type"] == "token" for f in frames)
        # The aggregator bills after the gateway delivered: wait for every hop's span.
        expected = 8
        deadline = time.monotonic() + 60
        while True:
            spans = [
                s
                for s in read_spans(spans_file)
                if s["attributes"].get("llmstream.request_id") == request_id
                or s["attributes"].get("messaging.kafka.message.key") == request_id
            ]
            trace_ids = {s["trace_id"] for s in spans}
            assert len(trace_ids) <= 1, trace_ids
            if trace_ids:
                trace_id = trace_ids.pop()
                spans = [s for s in read_spans(spans_file) if s["trace_id"] == trace_id]
            if len(spans) >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)

    assert len(spans) == expected, [(s["service"], s["name"]) for s in spans]
    assert {s["service"] for s in spans} == {"gateway", "worker", "model-server", "aggregator"}
    assert len({s["trace_id"] for s in spans}) == 1

    submit = by_name(spans, "gateway", "submit")
    send_prompt = by_name(spans, "gateway", f"send {stack.prompts_topic}")
    process_prompt = by_name(spans, "worker", f"process {stack.prompts_topic}")
    rpc_client = by_name(spans, "worker", "llmstream.v1.ModelService/Generate")
    rpc_server = by_name(spans, "model-server", "llmstream.v1.ModelService/Generate")
    send_tokens = by_name(spans, "worker", f"send {stack.tokens_topic}")
    deliver = by_name(spans, "gateway", f"process {stack.tokens_topic}")
    bill = by_name(spans, "aggregator", f"process {stack.tokens_topic}")

    # The request's span tree, hop by hop.
    assert submit["parent_span_id"] is None
    parent_of = {
        "send prompt": (send_prompt, submit),
        "worker process": (process_prompt, send_prompt),
        "grpc client": (rpc_client, process_prompt),
        "grpc server": (rpc_server, rpc_client),
        "send tokens": (send_tokens, process_prompt),
        "gateway delivery": (deliver, send_tokens),
        "aggregator bill": (bill, send_tokens),
    }
    for hop, (child, parent) in parent_of.items():
        assert child["parent_span_id"] == parent["span_id"], hop

    kinds = {
        "SERVER": [submit, rpc_server],
        "PRODUCER": [send_prompt, send_tokens],
        "CONSUMER": [process_prompt, deliver, bill],
        "CLIENT": [rpc_client],
    }
    for kind, members in kinds.items():
        assert all(s["kind"] == kind for s in members), kind

    # Semantic conventions: messaging (Kafka) and RPC (gRPC).
    for s in (send_prompt, process_prompt, send_tokens, deliver, bill):
        a = s["attributes"]
        assert a["messaging.system"] == "kafka"
        assert a["messaging.kafka.message.key"] == request_id
        assert a["messaging.operation.name"] == s["name"].split(" ")[0]
    assert process_prompt["attributes"]["messaging.destination.name"] == stack.prompts_topic
    for s in (rpc_client, rpc_server):
        assert s["attributes"]["rpc.system"] == "grpc"
        assert s["attributes"]["rpc.service"] == "llmstream.v1.ModelService"
        assert s["attributes"]["rpc.method"] == "Generate"
        assert s["attributes"]["rpc.grpc.status_code"] == 0
    assert rpc_client["attributes"]["server.port"] == int(stack.model_server.split(":")[1])
    assert bill["attributes"]["llmstream.billed"] is True

    # First token and finish are span events, not spans (no span per token).
    for s in (rpc_server, send_tokens, deliver):
        assert event_names(s) == ["first_token", "finish"], s["name"]

    # Time runs forward along the tree (one clock: the same machine).
    assert submit["start_ns"] <= send_prompt["start_ns"] <= process_prompt["start_ns"]
    assert rpc_client["start_ns"] <= rpc_server["start_ns"] <= rpc_server["end_ns"]
    assert send_tokens["start_ns"] <= deliver["start_ns"]
