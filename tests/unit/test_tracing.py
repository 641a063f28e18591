"""llmstream.tracing: exporter choice from the standard OTel variables, trace context in and
out, and the gateway's delivery spans (in-memory exporter, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.delivery_trace import DeliverySpans
from llmstream import codec, config, tracing
from llmstream.v1 import events_pb2


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
    ],
)
def test_exporters_follow_the_standard_variables(env: dict[str, str], expected: list[str]) -> None:
    assert tracing.exporter_names(env) == expected


def test_an_unsupported_exporter_is_a_one_line_config_error() -> None:
    with pytest.raises(
        config.ConfigError, match="OTEL_TRACES_EXPORTER: unsupported exporter zipkin"
    ):
        tracing.exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_trace_context_round_trips_through_a_traceparent(spans: InMemorySpanExporter) -> None:
    with tracing.tracer().start_as_current_span("parent") as parent:
        traceparent, _ = tracing.trace_context_of(parent)
    remote = tracing.context_of(traceparent)
    assert remote is not None
    tracing.tracer().start_span("child", context=remote).end()
    parent_span, child = spans.get_finished_spans()
    assert child.parent is not None
    assert child.parent.span_id == parent_span.context.span_id
    assert child.context.trace_id == parent_span.context.trace_id


@pytest.mark.parametrize(
    "bad", ["", "garbage", "00-xyz-abc-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"]
)
def test_a_missing_or_malformed_traceparent_starts_a_new_trace(bad: str) -> None:
    assert tracing.context_of(bad) is None


def _event(request_id: str, traceparent: str, body: str, seq: int = 0) -> events_pb2.Event:
    ev = codec.new_event(request_id, "t1", "w1")
    ev.trace.traceparent = traceparent
    if body == "token_delta":
        ev.token_delta.seq = seq
        ev.token_delta.text = "x"
    elif body == "started":
        ev.started.attempt = 1
    else:
        ev.completed.last_seq = seq
    return ev


def test_delivery_span_covers_first_delivered_event_to_terminal(
    spans: InMemorySpanExporter,
) -> None:
    producer = tracing.tracer().start_span("send tokens", kind=SpanKind.PRODUCER)
    traceparent, _ = tracing.trace_context_of(producer)
    producer.end()
    delivery = DeliverySpans("tokens")
    delivery.on_event(_event("r1", traceparent, "started"), 3, 10, delivered=1)
    for seq in (1, 2, 3):
        delivery.on_event(_event("r1", traceparent, "token_delta", seq), 3, 10 + seq, delivered=1)
    assert len(delivery) == 1
    delivery.on_event(_event("r1", traceparent, "completed", 3), 3, 14, delivered=2)
    assert len(delivery) == 0
    send, deliver = spans.get_finished_spans()
    assert deliver.kind is SpanKind.CONSUMER
    assert deliver.name == "process tokens"
    assert deliver.parent is not None and deliver.parent.span_id == send.context.span_id
    assert [e.name for e in deliver.events] == ["first_token", "finish"]
    assert deliver.events[0].attributes == {"llmstream.seq": 1}
    assert deliver.attributes is not None
    assert deliver.attributes["messaging.destination.partition.id"] == "3"
    assert deliver.attributes["messaging.kafka.offset"] == 10


def test_events_nobody_here_watches_open_no_span(spans: InMemorySpanExporter) -> None:
    delivery = DeliverySpans("tokens")
    delivery.on_event(_event("r1", "", "token_delta", 1), 0, 0, delivered=0)
    delivery.on_event(_event("r1", "", "completed", 1), 0, 1, delivered=0)
    assert len(delivery) == 0
    assert spans.get_finished_spans() == ()


def test_open_delivery_spans_are_bounded(spans: InMemorySpanExporter) -> None:
    delivery = DeliverySpans("tokens", limit=2)
    for rid in ("r1", "r2", "r3"):
        delivery.on_event(_event(rid, "", "token_delta", 1), 0, 0, delivered=1)
    assert len(delivery) == 2
    (evicted,) = spans.get_finished_spans()
    assert evicted.attributes is not None
    assert evicted.attributes["llmstream.delivery.incomplete"] is True
    assert evicted.attributes["messaging.kafka.message.key"] == "r1"


def test_json_lines_exporter_writes_one_parseable_span_per_line(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    provider.add_span_processor(SimpleSpanProcessor(tracing.JsonLinesSpanExporter(str(path))))
    t = provider.get_tracer("test")
    with t.start_as_current_span("a", attributes={"k": 1}) as a:
        a.add_event("first_token")
        t.start_span("b").end()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["b", "a"]
    b, a_row = rows
    assert b["parent_span_id"] == a_row["span_id"]
    assert a_row["parent_span_id"] is None
    assert a_row["service"] == "svc"
    assert a_row["attributes"] == {"k": 1}
    assert a_row["events"][0]["name"] == "first_token"
    assert a_row["start_ns"] <= a_row["end_ns"]
