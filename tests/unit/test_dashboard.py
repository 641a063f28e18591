"""Grafana, Prometheus and collector configs in deploy/ checked against the code: the dashboard
and the alerting rules only query metrics the services declare (the dashboard through a
provisioned datasource); every alert has a runbook; every annotated Kubernetes pod is scraped
on a port it serves; the collector forwards traces to Jaeger. (A real Prometheus runs the
dashboard's queries and the alerts in tests/integration/test_prometheus.py; promtool unit-tests
the rules in tests/prometheus.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from llmstream import config
from llmstream_tools import metric_catalog

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\b((?:gateway|llmstream)_[a-z0-9_]+)\b")
# Label names (`by (gateway_id)`) and matchers (`{outcome!~"..."}`) are not metric names.
LABELS = re.compile(r"\b(?:by|without)\s*\([^)]*\)|\{[^}]*\}")


def dashboard() -> dict[str, Any]:
    data = json.loads((DEPLOY / "grafana" / "dashboards" / "llmstream.json").read_text())
    assert isinstance(data, dict)
    return data


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def declared_series() -> dict[str, str]:
    """Every series name a query may use -> the OpenTelemetry instrument kind."""
    out = {}
    for inst, name in metric_catalog.prometheus_names(metric_catalog.declared()).items():
        if inst.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = inst.kind
        else:
            out[name] = inst.kind
    return out


def test_dashboard_queries_only_declared_metrics() -> None:
    known = declared_series()
    used = set()
    for expr in exprs(dashboard()):
        names = METRIC.findall(LABELS.sub("", expr))
        assert names, f"no llmstream metric in {expr!r}"
        for name in names:
            assert name in known, f"{name} (in {expr!r}) is not declared by any service"
            if known[name] == "counter":
                assert "rate(" in expr, f"counter {name} without rate(): {expr!r}"
            used.add(name)
        if "histogram_quantile(" in expr:
            assert "_bucket[" in expr and "le" in expr, expr
    # The panels the dashboard promises: TTFT/ITL percentiles, tokens/s, lag, errors, sockets.
    for name in (
        "gateway_time_to_first_token_seconds_bucket",
        "llmstream_time_to_first_token_seconds_bucket",
        "llmstream_inter_token_latency_seconds_bucket",
        "llmstream_generation_tokens_total",
        "llmstream_worker_prompt_lag",
        "llmstream_aggregator_lag_events",
        "gateway_requests_total",
        "gateway_sockets",
    ):
        assert name in used, f"the dashboard does not show {name}"


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_alert_rules_query_only_declared_metrics() -> None:
    known = declared_series()
    rules = alert_rules()
    for rule in rules:
        expr = rule["expr"]
        names = METRIC.findall(LABELS.sub("", expr))
        assert names, f"{rule['alert']}: no llmstream metric in {expr!r}"
        for name in names:
            assert name in known, f"{rule['alert']}: {name} is not declared by any service"
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{rule['alert'].lower()}"
    # The SLOs of issue 20, each with an alert.
    assert {r["alert"] for r in rules} == {
        "TimeToFirstTokenP99High",
        "PromptLagGrowing",
        "BillingLagHigh",
        "BillingStalled",
        "DeadLetterRecords",
        "WorkerRetriesExhausted",
        "ModelServerNotServing",
        "GatewaySocketsNearCap",
    }


def test_every_alert_has_a_runbook_section() -> None:
    headings = {
        line[4:].strip()
        for line in (REPO / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("### ")
    }
    for rule in alert_rules():
        assert rule["alert"] in headings, f"docs/operations.md has no `### {rule['alert']}`"


def test_socket_cap_alert_is_80_percent_of_the_default_cap() -> None:
    # The cap is not exported as a series: the rule carries it as a number.
    (rule,) = [r for r in alert_rules() if r["alert"] == "GatewaySocketsNearCap"]
    threshold = re.fullmatch(r".*\(gateway_sockets\) > (\d+)", rule["expr"].strip())
    assert threshold is not None, rule["expr"]
    (default,) = [s.default for s in config.SETTINGS if s.name == "GATEWAY_MAX_SOCKETS"]
    assert int(threshold.group(1)) == int(default) * 8 // 10


def test_dashboard_uses_provisioned_datasources() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    sources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "llmstream.yml").read_text()
    )["datasources"]
    uids = {s["uid"]: s for s in sources}
    assert uids["prometheus"]["type"] == "prometheus"
    assert uids["prometheus"]["url"] == "http://prometheus:9090"
    assert uids["jaeger"]["type"] == "jaeger"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for ds in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ds["uid"] in uids and uids[ds["uid"]]["type"] == ds["type"], panel["title"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "llmstream.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_collector_forwards_traces_to_jaeger() -> None:
    c = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    protocols = c["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"].endswith(":4318")  # the services' OTLP http/protobuf
    traces = c["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    for name in traces["exporters"]:
        assert c["exporters"][name]["endpoint"].startswith("jaeger:")
    for name in traces["processors"]:
        assert name in c["processors"]


def test_every_annotated_pod_is_scraped_on_a_port_it_serves() -> None:
    k8s = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-k8s.yml").read_text())
    relabels = k8s["scrape_configs"][0]["relabel_configs"]
    assert any(
        r.get("source_labels") == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
        for r in relabels
    )
    seen = {}
    for path in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            template = (doc or {}).get("spec", {}).get("template")
            if not template:
                continue
            notes = template["metadata"].get("annotations", {})
            if notes.get("prometheus.io/scrape") != "true":
                continue
            ports = {
                p["containerPort"]
                for c in template["spec"]["containers"]
                for p in c.get("ports", [])
            }
            port = int(notes["prometheus.io/port"])
            assert port in ports, f"{doc['metadata']['name']}: scraped on {port}, serves {ports}"
            seen[doc["metadata"]["name"]] = port
    assert set(seen) == {
        "llmstream-gateway",
        "llmstream-worker",
        "llmstream-model-server",
        "llmstream-aggregator",
    }
