"""`llmstream model-server --engine vllm` from the main virtualenv (no vLLM there): the default
model, and the re-execution under the vLLM virtualenv or one line saying how to make it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_server import cli, vllm_env
from model_server.settings import ModelsConfigError
from model_server.types import ModelLimits

BASE = ModelLimits()


def converted(cache: Path) -> Path:
    """A stand-in of `make vllm`'s converted directory: the stamp and the file it lists."""
    directory = cache / "models" / vllm_env.SMOLLM2_DIR
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    stamp = {"files": {"model.safetensors": {"bytes": 7, "sha256": "0" * 64}}}
    (directory / vllm_env.STAMP).write_text(json.dumps(stamp))
    return directory


def test_default_model_is_the_converted_smollm2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSTREAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LLMSTREAM_VLLM_MODEL", raising=False)
    with pytest.raises(ModelsConfigError, match="make vllm"):
        cli.single_model_spec(cli.build_parser().parse_args(["--engine", "vllm"]), BASE)
    directory = converted(tmp_path)
    spec = cli.single_model_spec(cli.build_parser().parse_args(["--engine", "vllm"]), BASE)
    assert spec.name == "smollm2" and spec.options["model"] == str(directory)
    assert spec.options["tensor_parallel_size"] == 1
    assert spec.options["gpu_memory_utilization"] == 0.9
    assert spec.limits.max_concurrency == 64  # vLLM's max_num_seqs
    (directory / "model.safetensors").write_bytes(b"torn")  # size differs from the stamp
    with pytest.raises(ModelsConfigError, match="not converted"):
        cli.single_model_spec(cli.build_parser().parse_args(["--engine", "vllm"]), BASE)


def test_gpu_settings_map_to_engine_options() -> None:
    args = cli.build_parser().parse_args(
        [
            "--engine=vllm",
            "--vllm-model=HuggingFaceTB/SmolLM2-1.7B-Instruct",
            "--vllm-tensor-parallel-size=2",
            "--vllm-gpu-memory-utilization=0.85",
            "--max-concurrency=128",
        ]
    )
    spec = cli.single_model_spec(args, BASE)
    assert spec.name == "SmolLM2-1.7B-Instruct"
    assert spec.options == {
        "model": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
    }
    assert spec.limits.max_concurrency == 128


def test_without_the_vllm_virtualenv_one_line_says_how_to_make_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not vllm_env.vllm_importable()  # the main virtualenv stays lean
    monkeypatch.setenv("LLMSTREAM_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["--engine", "vllm", "--vllm-model", "m", "--metrics-port", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make vllm" in err[0], err


def test_reexecutes_itself_under_the_vllm_python(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "LLMSTREAM_VLLM_PYTHON": str(python)}
    args = ["--engine", "vllm", "--vllm-model", "m", "--port", "0", "--metrics-port", "0"]
    out = subprocess.run(
        [sys.executable, "-m", "llmstream_tools.cli", "model-server", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["-m", "model_server", *args]
