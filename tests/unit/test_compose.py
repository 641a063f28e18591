"""docker-compose.yml cannot run here (no Docker engine); check it against the code instead:
every llmstream command it runs exists, and every LLMSTREAM_* variable it sets is a setting."""

from __future__ import annotations

import contextlib
import importlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmstream import cli, config

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def llmstream_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("image") == "llmstream:local"
    }


def test_compose_has_infrastructure_and_every_component() -> None:
    services = compose()["services"]
    assert {"kafka", "postgres", "redis", "init"} <= set(services)
    commands = [svc["command"][0] for svc in llmstream_services().values()]
    assert {"gateway", "worker", "model-server", "aggregator", "infra"} <= set(commands)
    assert commands.count("gateway") == 2
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["kafka"]["image"].startswith("apache/kafka:4.")


def test_every_llmstream_variable_is_a_setting() -> None:
    known = {s.env for s in config.SETTINGS}
    for name, svc in llmstream_services().items():
        for var in svc.get("environment", {}):
            if var.startswith("LLMSTREAM_"):
                assert var in known, f"{name}: {var} is not a setting in llmstream/config.py"


@pytest.mark.parametrize("service", sorted(llmstream_services()))
def test_every_command_and_flag_exists(service: str) -> None:
    command = llmstream_services()[service]["command"]
    assert command[0] in cli.DELEGATED, f"{service}: no `llmstream {command[0]}`"
    module_name = cli.DELEGATED[command[0]][0]
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError:
        # Honest and loud in the test report; turns into a real check once the service exists.
        pytest.xfail(f"{service}: `llmstream {command[0]}` is not built yet ({module_name})")
    # The flags the compose file passes must be ones the command knows.
    help_text = io.StringIO()
    prefix = [command[1]] if command[0] == "infra" else []
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        cli.main([command[0], *prefix, "--help"])
    for arg in command[1:]:
        if arg.startswith("--"):
            assert arg in help_text.getvalue(), f"{service}: unknown flag {arg}"


def test_services_wait_for_healthy_dependencies() -> None:
    services = compose()["services"]
    for name in ("kafka", "postgres", "redis"):
        assert "healthcheck" in services[name]
    init_deps = services["init"]["depends_on"]
    assert all(d["condition"] == "service_healthy" for d in init_deps.values())
    for name, svc in llmstream_services().items():
        if name != "init":
            assert svc["depends_on"]["init"]["condition"] == "service_completed_successfully"
