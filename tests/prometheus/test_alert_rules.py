"""The alerting rules of deploy/prometheus/rules under Prometheus's own tooling: `promtool check
rules` accepts every file and `promtool test rules` runs the synthetic-series unit tests of
tests/prometheus/*_test.yml (each alert fires on the trouble it names, stays quiet otherwise).
promtool comes with Debian's `prometheus` package (`make prometheus`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
UNIT_TESTS = sorted(Path(__file__).parent.glob("*_test.yml"))


def promtool(*args: str) -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool not found: run `make prometheus` (deploy/local/prometheus.sh)"
    done = subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def alert_names(path: Path) -> list[str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_accepts_every_rule_file() -> None:
    assert RULES, "no rule files in deploy/prometheus/rules"
    out = promtool("check", "rules", *map(str, RULES))
    assert out.count("SUCCESS") == len(RULES), out


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    tested: set[str] = set()
    for path in UNIT_TESTS:
        spec = yaml.safe_load(path.read_text())
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                # A check that expects alerts proves the rule fires; one without, that it
                # stays quiet: each alert needs both.
                tested.add(f"{check['alertname']}:{'fires' if check['exp_alerts'] else 'quiet'}")
        assert (path.parent / spec["rule_files"][0]).resolve() in RULES
    for name in (a for path in RULES for a in alert_names(path)):
        assert f"{name}:fires" in tested, f"no promtool test where {name} fires"
        assert f"{name}:quiet" in tested, f"no promtool test where {name} stays quiet"
    out = promtool("test", "rules", *(p.name for p in UNIT_TESTS))
    assert "SUCCESS" in out and "FAILED" not in out, out


def test_promtool_accepts_the_compose_config() -> None:
    # (prometheus-k8s.yml needs kubernetes_sd_configs, which Debian's build leaves out.)
    config = REPO / "deploy" / "prometheus" / "prometheus.yml"
    assert "SUCCESS" in promtool("check", "config", str(config))
