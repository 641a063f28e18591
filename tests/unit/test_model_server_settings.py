"""Models config file, CLI flags and request validation (no network)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmstream.v1 import common_pb2
from llmstream_tools.testing.model_server import start
from model_server import cli
from model_server.engines.synthetic import SyntheticEngine
from model_server.errors import InvalidArgument
from model_server.registry import ModelHandle, ModelSpec, ModelState
from model_server.settings import ModelsConfigError, load_models_file, parse_models
from model_server.types import ModelLimits
from model_server.validation import parse_start, prepare

BASE = ModelLimits()


def test_models_file_with_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        """
defaults:
  max_queue: 7
models:
  - name: smollm2
    engine: llamacpp
    version: q4_1
    limits: {max_concurrency: 2, max_context: 1024, max_tokens: 300}
    options: {instances: 2}
  - name: fast
    engine: synthetic
    options: {ttft_ms: 1, itl_ms: 0}
"""
    )
    specs = load_models_file(path, BASE)
    assert [s.name for s in specs] == ["smollm2", "fast"]
    assert specs[0].version == "q4_1"
    assert specs[0].limits.max_queue == 7 and specs[0].limits.max_concurrency == 2
    assert specs[0].limits.default_max_tokens == 256  # below the cap: kept
    assert specs[1].limits.max_tokens == BASE.max_tokens
    assert specs[1].options == {"ttft_ms": 1, "itl_ms": 0}


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"models": [{"name": "a", "engine": "gpt"}]}, "models[0].engine"),
        ({"models": [{"engine": "synthetic"}]}, "models[0].name"),
        ({"models": [{"name": "a", "engine": "synthetic", "limits": {"max_qeue": 1}}]}, "max_qeue"),
        ({"models": [{"name": "a", "engine": "synthetic"}] * 2}, "appears twice"),
        (
            {"models": [{"name": "a", "engine": "synthetic", "limits": {"max_tokens": -1}}]},
            "negative",
        ),
        ({"model": []}, "models"),
        ({"models": []}, "empty"),
    ],
)
def test_models_file_errors_name_the_entry(data: object, needle: str) -> None:
    with pytest.raises(ModelsConfigError) as err:
        parse_models(data, BASE)
    assert needle in str(err.value)


def test_cli_single_model_defaults() -> None:
    args = cli.build_parser().parse_args(["--engine", "llamacpp", "--llamacpp-instances", "3"])
    spec = cli.single_model_spec(args, BASE)
    assert spec.name == "smollm2" and spec.engine == "llamacpp"
    assert spec.limits.max_concurrency == 3 and spec.options["instances"] == 3
    args = cli.build_parser().parse_args(["--engine", "synthetic", "--synthetic-itl-ms", "5"])
    spec = cli.single_model_spec(args, BASE)
    assert spec.options == {"ttft_ms": 20.0, "itl_ms": 5.0}


def test_cli_rejects_a_bad_models_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("models: [{name: a, engine: nope}]")
    assert cli.main(["--models", str(bad), "--metrics-port", "0"]) == 2
    assert "models[0].engine" in capsys.readouterr().err


async def handle(**limits: int) -> ModelHandle:
    spec = ModelSpec("m", "synthetic", limits=ModelLimits(**limits))
    eng = SyntheticEngine({}, spec.limits)
    await eng.load()
    h = ModelHandle(spec, eng)
    h.state = ModelState.READY
    return h


async def test_context_is_capped_and_reported() -> None:
    h = await handle(max_context=50, max_tokens=100)
    prepared = await prepare(parse_start(start("m", text="x" * 30, max_tokens=100), h.limits), h)
    assert prepared.request.max_new_tokens == 20
    assert "context" in prepared.length_message
    prepared = await prepare(parse_start(start("m", text="x" * 30, max_tokens=10), h.limits), h)
    assert prepared.request.max_new_tokens == 10 and prepared.length_message == ""
    cont = parse_start(start("m", text="x" * 30, max_tokens=100, continuation=[65] * 15), h.limits)
    assert (await prepare(cont, h)).request.max_new_tokens == 5


async def test_default_max_tokens_and_unique_engine_ids() -> None:
    h = await handle(default_max_tokens=33)
    a = await prepare(parse_start(start("m", max_tokens=0), h.limits), h)
    b = await prepare(parse_start(start("m", max_tokens=0), h.limits), h)
    assert a.request.max_new_tokens == 33
    assert a.request.request_id != b.request.request_id
    assert a.request.request_id.startswith("req-1#")


async def test_prompt_too_long_is_invalid() -> None:
    h = await handle(max_context=10)
    with pytest.raises(InvalidArgument) as err:
        await prepare(parse_start(start("m", text="y" * 10), h.limits), h)
    assert err.value.field == "start.prompt"


def test_sampling_defaults_follow_the_proto() -> None:
    msg = start("m", temperature=None)
    msg.sampling.CopyFrom(common_pb2.SamplingParams())
    parsed = parse_start(msg, BASE)
    assert parsed.sampling.temperature == 1.0 and parsed.sampling.top_p == 1.0
    assert parsed.sampling.seed is None and not parsed.sampling.greedy


async def test_admission_bounds_in_flight_streams() -> None:
    from model_server.errors import Overloaded, Unavailable

    h = await handle(max_concurrency=2, max_queue=1)
    for _ in range(3):
        h.admit()
    with pytest.raises(Overloaded):
        h.admit()
    h.release()
    h.admit()
    h.state = ModelState.RETIRING
    with pytest.raises(Unavailable):
        h.admit()
    for _ in range(3):
        h.release()
    assert await h.wait_idle(0.1)
    assert not asyncio.get_running_loop().is_closed()
