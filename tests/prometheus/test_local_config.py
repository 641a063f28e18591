"""The configuration `llmstream infra up --with-prometheus` and the Prometheus tests generate
(llmstream_tools/infra/_prometheus.py), checked by promtool: valid, every job reading its
targets file, the rules of deploy/prometheus/rules loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmstream_tools.infra import InfraError, _prometheus
from tests.prometheus.test_alert_rules import RULES, alert_names, promtool


def test_generated_config_passes_promtool_with_the_rules(tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    ports = {"gateway": 9100, "gateway-1": 9101, "worker-0": 9103, "worker-1": 9104}
    ports |= {"model-server": 9464, "aggregator": 9102}
    _prometheus.write_targets(targets, ports)
    config = tmp_path / "prometheus.yml"
    config.write_text(_prometheus.config_text(targets, _prometheus.rule_files(), 1.0, 2.0))
    out = promtool("check", "config", str(config))
    assert f"SUCCESS: {len(RULES)} rule files found" in out, out
    for path in RULES:
        assert f"Checking {path}\n  SUCCESS: {len(alert_names(path))} rules found" in out, out

    cfg = yaml.safe_load(config.read_text())
    assert cfg["global"] == {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "2s",
    }
    assert [Path(p) for p in cfg["rule_files"]] == RULES
    jobs = {j["job_name"]: j["file_sd_configs"][0]["files"] for j in cfg["scrape_configs"]}
    assert jobs == {job: [str(targets / f"{job}.json")] for job in _prometheus.JOBS}
    workers = json.loads((targets / "worker.json").read_text())
    assert workers == [
        {"targets": ["127.0.0.1:9103"], "labels": {"process": "worker-0"}},
        {"targets": ["127.0.0.1:9104"], "labels": {"process": "worker-1"}},
    ]
    gateways = json.loads((targets / "gateway.json").read_text())
    assert [g["labels"]["process"] for g in gateways] == ["gateway", "gateway-1"]


def test_intervals_in_prometheus_duration_syntax() -> None:
    assert [_prometheus.duration(s) for s in (5.0, 0.5, 1.25, 0.001)] == [
        "5s",
        "500ms",
        "1250ms",
        "1ms",
    ]
    with pytest.raises(InfraError, match="not positive"):
        _prometheus.duration(0.0)


def test_a_process_of_no_known_service_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="no scrape job for process 'redis'"):
        _prometheus.write_targets(tmp_path, {"redis": 6379})
