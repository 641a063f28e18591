"""docs/metrics.md lists exactly the metrics the code declares, each under its service, with
its Prometheus name (as the real exporter names it) and type."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llmstream import telemetry
from llmstream_tools import metric_catalog

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {
    "Gateway": "gateway",
    "Worker": "worker",
    "Model server": "model_server",
    "Aggregator": "aggregator",
}
PROMETHEUS_TYPE = {
    "counter": "counter",
    "histogram": "histogram",
    "gauge": "gauge",
    "up_down_counter": "gauge",
}


def documented() -> set[tuple[str, str, str]]:
    """(service, Prometheus name, type) of every table row naming a metric."""
    rows = set()
    service = None
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        if line.startswith("## "):
            service = SECTIONS.get(line[3:].strip())
        elif service is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.add((service, cells[0].strip("`"), cells[1]))
    return rows


def declared() -> set[tuple[str, str, str]]:
    names = metric_catalog.prometheus_names(metric_catalog.declared())
    return {(i.service, name, PROMETHEUS_TYPE[i.kind]) for i, name in names.items()}


def test_docs_list_exactly_the_declared_metrics() -> None:
    docs, code = documented(), declared()
    assert len(code) > 40
    assert sorted(code - docs) == [], "declared in code, missing from docs/metrics.md"
    assert sorted(docs - code) == [], "in docs/metrics.md, not declared (or wrong service/type)"


def test_prometheus_names_follow_the_exporter_rules() -> None:
    names = {
        i.name: n for i, n in metric_catalog.prometheus_names(metric_catalog.declared()).items()
    }
    assert names["llmstream_worker_requests"] == "llmstream_worker_requests_total"
    assert names["gateway_sockets"] == "gateway_sockets"  # the HPA in deploy/k8s uses it
    assert names["gateway_time_to_first_token_seconds"] == "gateway_time_to_first_token_seconds"
    assert names["llmstream_aggregator_batch_duration"] == (
        "llmstream_aggregator_batch_duration_seconds"
    )


def test_every_service_declares_its_metrics_in_its_own_namespace() -> None:
    for inst in metric_catalog.declared():
        prefix = "gateway_" if inst.service == "gateway" else "llmstream_"
        assert inst.name.startswith(prefix), inst
        assert inst.description, f"{inst.name} has no description"


def test_prompt_text_is_logged_only_when_opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSTREAM_LOG_PROMPTS", raising=False)
    assert telemetry.log_prompts() is False  # the documented default
    monkeypatch.setenv("LLMSTREAM_LOG_PROMPTS", "0")
    assert telemetry.log_prompts() is False
    monkeypatch.setenv("LLMSTREAM_LOG_PROMPTS", "1")
    assert telemetry.log_prompts() is True


def test_log_lines_are_json_with_ids_and_masked_keys() -> None:
    record = logging.LogRecord(
        "gateway", logging.INFO, __file__, 1, "key lsk_ABCDEFGHIJKL", (), None
    )
    record.fields = {"model": "m"}
    with telemetry.log_context(request_id="req_1", tenant_id="t_1", trace_id="0" * 31 + "1"):
        line = json.loads(telemetry.JsonFormatter().format(record))
    assert line["request_id"] == "req_1" and line["tenant_id"] == "t_1"
    assert line["trace_id"] == "0" * 31 + "1"
    assert line["level"] == "info" and line["model"] == "m"
    assert "lsk_ABCDEFGHIJKL" not in line["msg"]
