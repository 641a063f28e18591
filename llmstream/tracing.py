"""OpenTelemetry tracing shared by every service: one trace per request.

The trace crosses process boundaries twice: in Kafka record headers (W3C `traceparent`,
copied into the event's `trace` field too, see docs/events.md; token events in the compact
shape carry neither, the request's `started` and terminal events do) and in gRPC metadata.
Spans per request (never per token: per-token timing lives in metrics):

  gateway   submit (SERVER, root) -> send <prompts> (PRODUCER)
  worker    process <prompts> (CONSUMER) -> llmstream.v1.ModelService/Generate (CLIENT)
                                         -> send <tokens> (PRODUCER; events first_token, finish)
  model     llmstream.v1.ModelService/Generate (SERVER; events first_token, finish)
  gateway   process <tokens> (CONSUMER; delivery to sockets; events first_token, finish)
  aggregator process <tokens> (CONSUMER; the terminal event billed)

Exporters follow the standard OpenTelemetry variables:
- OTEL_TRACES_EXPORTER: comma list of `otlp`, `console`, `none`. Unset: `otlp` when
  OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, else none.
  OTLP is http/protobuf (collector port 4318); its endpoint, headers and timeout come from
  the OTEL_EXPORTER_OTLP_* variables, read by the exporter itself.
- OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on),
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_* (batching): read by the SDK.
- LLMSTREAM_TRACES_FILE: also append every finished span as one JSON line to this file
  (for tests and for looking at a trace without a collector).

A TracerProvider is installed even with no exporter: span ids are still generated, so the
trace id in log lines and in the events is real and the same in every service.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmstream import config

log = logging.getLogger(__name__)

TRACER_NAME = "llmstream"
_propagator = TraceContextTextMapPropagator()
_ready = False

__all__ = [
    "Span",
    "SpanKind",
    "Status",
    "StatusCode",
    "context_of",
    "exporter_names",
    "grpc_attributes",
    "kafka_attributes",
    "setup_tracing",
    "trace_context_of",
    "tracer",
]


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """Which exporters the standard variables ask for (pure; see the module docstring)."""
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if "none" in names:
        return []
    unknown = sorted(set(names) - {"otlp", "console"})
    if unknown:
        raise config.ConfigError(
            f"OTEL_TRACES_EXPORTER: unsupported exporter {', '.join(unknown)} "
            "(supported: otlp, console, none)"
        )
    return names


class JsonLinesSpanExporter(SpanExporter):
    """Appends each span as one JSON object per line (ids in hex, times in ns)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_dict(s), default=str) + "\n" for s in spans]
        try:
            with self._lock, open(self._path, "a", encoding="utf-8") as f:
                f.writelines(lines)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "ts_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
    }


def setup_tracing(service: str, env: Mapping[str, str] | None = None) -> TracerProvider:
    """Install the global TracerProvider for this process (once)."""
    global _ready
    env = os.environ if env is None else env
    current = trace.get_tracer_provider()
    if _ready and isinstance(current, TracerProvider):
        return current
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service}
    # The SDK reads OTEL_TRACES_SAMPLER(_ARG) when no sampler is passed.
    provider = TracerProvider(resource=Resource.create(attributes))
    names = exporter_names(env)
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    path = env.get(config.PREFIX + "TRACES_FILE", "")
    if path:
        exporters.append(JsonLinesSpanExporter(path))
    for exporter in exporters:
        # Export happens on the processor's thread, never on the event loop.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _ready = True
    if names or path:
        log.info("tracing on", extra={"fields": {"exporters": names + (["file"] if path else [])}})
    return provider


# A proxy until setup_tracing installs the provider, then bound to it (once): get_tracer per
# span cost 1.5-4 % CPU in the services (py-spy, `llmstream bench`).
_tracer = trace.get_tracer(TRACER_NAME)


def tracer() -> trace.Tracer:
    return _tracer


def context_of(traceparent: str, tracestate: str = "") -> otel_context.Context | None:
    """The remote parent carried by a W3C traceparent (None if absent or malformed)."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = _propagator.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def trace_context_of(span: Span) -> tuple[str, str]:
    """(traceparent, tracestate) that make `span` the parent on the other side."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def kafka_attributes(
    operation: str,
    topic: str,
    *,
    partition: int | None = None,
    key: str | None = None,
    offset: int | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """OpenTelemetry messaging semantic conventions (Kafka). `operation` is the operation
    name: send, process or receive; the span name is `<operation> <topic>`."""
    attrs: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.name": operation,
        "messaging.operation.type": operation,
        "messaging.destination.name": topic,
    }
    if partition is not None:
        attrs["messaging.destination.partition.id"] = str(partition)
    if key is not None:
        attrs["messaging.kafka.message.key"] = key
    if offset is not None:
        attrs["messaging.kafka.offset"] = offset
    if group is not None:
        attrs["messaging.consumer.group.name"] = group
    return attrs


GENERATE_METHOD = "llmstream.v1.ModelService/Generate"


def grpc_attributes(address: str | None = None) -> dict[str, Any]:
    """OpenTelemetry RPC semantic conventions for our one streaming method."""
    attrs: dict[str, Any] = {
        "rpc.system": "grpc",
        "rpc.service": "llmstream.v1.ModelService",
        "rpc.method": "Generate",
    }
    if address:
        host, _, port = address.rpartition(":")
        attrs["server.address"] = host or address
        if port.isdigit():
            attrs["server.port"] = int(port)
    return attrs
