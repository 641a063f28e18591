"""The GPU deployments can start: the k8s gpu overlay and the compose `gpu` profile run the
`llmstream:gpu` image (the Dockerfile's `gpu` target, vLLM pinned to the version `make vllm`
tests), name a model, give vLLM writable places under a read-only root, and their settings
turn into the vLLM engine arguments we expect (no GPU here: checked against the code)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from model_server import cli
from model_server.engines.vllm import engine_args
from tests.unit.test_k8s import containers, render

REPO = Path(__file__).resolve().parents[2]
IMAGE = "llmstream:gpu"


def pinned_vllm() -> str:
    script = (REPO / "deploy" / "local" / "vllm.sh").read_text()
    match = re.search(r"^VLLM_VERSION=(\S+)", script, re.M)
    assert match
    return match.group(1)


def engine_arguments(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """vLLM's AsyncEngineArgs keywords on a GPU for a model-server command line and env."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert args[0] == "model-server"
    parsed = cli.build_parser().parse_args(args[1:])
    spec = cli.single_model_spec(parsed, cli.base_limits(parsed))
    assert spec.name == "smollm2"  # what the browser page and clients ask for
    return engine_args(spec.options, spec.limits, on_cpu=False)


def test_gpu_image_pins_the_tested_vllm_and_one_name_is_used() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"FROM vllm/vllm-openai:v{pinned_vllm()} AS gpu" in dockerfile
    assert f"docker build --target gpu -t {IMAGE} ." in dockerfile
    assert f"docker build --target gpu -t {IMAGE} ." in (REPO / "docs" / "deploy.md").read_text()
    (env_line,) = [line for line in dockerfile.split("AS gpu")[1].splitlines() if "ENV" in line]
    assert "HF_HUB_OFFLINE" not in env_line  # LLMSTREAM_VLLM_DOWNLOAD decides


def test_k8s_gpu_overlay_starts_vllm_with_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    ((_, ms),) = [(o, c) for o, c in containers(render("gpu")) if o == "llmstream-model-server"]
    assert ms["image"] == IMAGE
    env = {e["name"]: e["value"] for e in ms["env"]}
    assert env["LLMSTREAM_VLLM_MODEL"] and env["LLMSTREAM_VLLM_DOWNLOAD"] == "1"
    gpus = int(ms["resources"]["limits"]["nvidia.com/gpu"])
    args = engine_arguments(ms["args"], env, monkeypatch)
    assert args["model"] == env["LLMSTREAM_VLLM_MODEL"]
    assert args["tensor_parallel_size"] == gpus
    assert 0 < args["gpu_memory_utilization"] <= 0.95
    assert args["max_num_seqs"] == 64 and args["max_model_len"] == 8192
    # Read-only root filesystem: every place vLLM writes is a volume.
    assert ms["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in ms["volumeMounts"]}
    home = "/home/llmstream"
    assert {f"{home}/.cache", f"{home}/state", f"{home}/.triton", "/tmp", "/dev/shm"} <= mounts


def test_compose_gpu_profile_starts_vllm_with_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    svc = services["model-server-gpu"]
    assert svc["profiles"] == ["gpu"] and svc["image"] == IMAGE
    assert svc["build"] == {"context": ".", "target": "gpu"}
    env = {k: str(v) for k, v in svc["environment"].items() if k.startswith("LLMSTREAM_VLLM")}
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    args = engine_arguments(svc["command"], env, monkeypatch)
    assert args["model"] == env["LLMSTREAM_VLLM_MODEL"]
    assert args["tensor_parallel_size"] == device["count"]
    assert "model-server" in services  # the CPU one stays the default without the profile
