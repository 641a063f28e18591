"""Structured JSON logs and OpenTelemetry metrics shared by every service.

Logs: one JSON object per line on stderr with service, level, logger, message and, when set in
the current task's context, request_id / tenant_id / trace_id. Prompt text and API keys are
never passed to the logger by our code; `redact()` masks anything that looks like a key in
free text that comes from elsewhere (exception messages).

Metrics: an OpenTelemetry MeterProvider whose reader is the Prometheus exporter; each service
serves `/metrics` (its own HTTP port or, for the gateway, its main port).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace

from llmstream import config

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_tenant_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant_id", default=None)
_trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

_service_name = "llmstream"

# API keys look like "lsk_<base32>"; anything of that shape is masked in log text.
_KEY_PATTERN = re.compile(r"lsk_[A-Za-z0-9_\-]{8,}")


def redact(text: str) -> str:
    return _KEY_PATTERN.sub("lsk_***", text)


@contextlib.contextmanager
def log_context(
    request_id: str | None = None, tenant_id: str | None = None, trace_id: str | None = None
) -> Iterator[None]:
    """Attach request/tenant/trace ids to every log line emitted inside the block."""
    tokens = []
    if request_id is not None:
        tokens.append((_request_id, _request_id.set(request_id)))
    if tenant_id is not None:
        tokens.append((_tenant_id, _tenant_id.set(tenant_id)))
    if trace_id is not None:
        tokens.append((_trace_id, _trace_id.set(trace_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": _service_name,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, var in (
            ("request_id", _request_id),
            ("tenant_id", _tenant_id),
            ("trace_id", _trace_id),
        ):
            value = var.get()
            if value is not None:
                entry[key] = value
        if "trace_id" not in entry:
            # Inside a span (llmstream/tracing.py) the line carries that span's trace.
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                entry["trace_id"] = f"{ctx.trace_id:032x}"
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(service: str, level: str | None = None) -> None:
    """Route all logging to stderr as JSON lines tagged with `service`."""
    global _service_name
    _service_name = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or config.get("LOG_LEVEL")).upper())
    # Client libraries are chatty at INFO about every (re)connect.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fields(**kv: Any) -> dict[str, Any]:
    """`log.info("msg", extra=fields(a=1))` adds structured fields to the JSON line."""
    return {"fields": kv}


def log_prompts() -> bool:
    """Whether prompt text may be logged: only with LLMSTREAM_LOG_PROMPTS=1 (opt-in)."""
    return config.get("LOG_PROMPTS") == "1"


_metrics_ready = False


def setup_metrics(service: str, port: int | None = None, host: str = "127.0.0.1") -> None:
    """Install a global MeterProvider exporting to Prometheus.

    With `port`, serve `/metrics` on its own HTTP server; without, the caller serves
    `prometheus_client.generate_latest()` itself (the gateway does, on its main port).
    """
    global _metrics_ready
    if _metrics_ready:
        return
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    reader = PrometheusMetricReader()
    provider = MeterProvider(
        resource=Resource.create({"service.name": service}), metric_readers=[reader]
    )
    metrics.set_meter_provider(provider)
    if port is not None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)
    _metrics_ready = True
