"""`llmstream up --engine vllm` (what `make up ENGINE=vllm` runs) serves the browser page and
its WebSocket from the real vLLM engine on CPU, and Ctrl-C stops it cleanly.

It runs against the shared infrastructure with topics, consumer groups, ports and a database
of its own, so it never meets another `make up` on the machine."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator

import pytest

from llmstream import config
from llmstream.ports import free_port
from llmstream_tools import stack
from llmstream_tools.testing.gateway import Client

pytestmark = pytest.mark.integration


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[dict[str, str]]:
    base = f"test.up{uuid.uuid4().hex[:8]}"
    names = {
        s.env: f"{base}.{s.name.removeprefix('TOPIC_').lower()}"
        for s in config.SETTINGS
        if s.name.startswith("TOPIC_") and s.name != "TOPIC_RETENTION_MS"
    }
    yield names  # `up` creates them
    await stack.delete_topics(kafka_bootstrap, names.values())


def read_until(proc: subprocess.Popen[str], prefix: str) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith(prefix):
        line = proc.stdout.readline()
        assert line, "up exited early:\n" + "".join(lines)
        lines.append(line)
    return lines


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
        return body


async def test_up_with_the_vllm_engine_serves_the_page(
    db_env: str, redis_url: str, topics: dict[str, str]
) -> None:
    gateway_port, model_port = free_port(), free_port()
    env = {
        **os.environ,
        **topics,
        "LLMSTREAM_REDIS_URL": redis_url,
        "LLMSTREAM_PROMPTS_PARTITIONS": "2",
        "LLMSTREAM_TOKENS_PARTITIONS": "2",
        "LLMSTREAM_GATEWAY_PORT": str(gateway_port),
        "LLMSTREAM_MODEL_SERVER_PORT": str(model_port),
        "LLMSTREAM_MODEL_SERVERS": f"127.0.0.1:{model_port}",
        "LLMSTREAM_MODEL_SERVER_METRICS_PORT": "0",
        "LLMSTREAM_WORKER_METRICS_PORT": "0",
        "LLMSTREAM_AGGREGATOR_METRICS_PORT": "0",
        "LLMSTREAM_WORKER_GROUP": f"{topics['LLMSTREAM_TOPIC_PROMPTS']}.workers",
        "LLMSTREAM_AGGREGATOR_GROUP": f"{topics['LLMSTREAM_TOPIC_PROMPTS']}.aggregator",
    }
    env.pop("LLMSTREAM_VLLM_MODEL", None)
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "llmstream_tools.cli", "up", "--engine", "vllm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # Printed only once the model server is SERVING (vLLM takes a while to load).
        lines = await asyncio.to_thread(read_until, proc, "dev API key")
        assert f"llmstream is up: http://127.0.0.1:{gateway_port}/" in "".join(lines)
        key = lines[-1].split(":", 1)[1].strip()

        page = await asyncio.to_thread(fetch, f"http://127.0.0.1:{gateway_port}/")
        assert b"<html" in page.lower()
        client = await Client.connect(gateway_port, key)
        try:
            await client.wait(lambda: client.hello is not None, within=30)
            assert client.hello is not None and client.hello["default_model"] == "smollm2"
            await client.send(
                {
                    "type": "submit",
                    "client_ref": "sea",
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
                    "max_tokens": 40,
                    "temperature": 0,
                }
            )
            accepted = await client.wait_ref("sea", within=30)
            assert accepted["type"] == "accepted", accepted
            rid = accepted["request_id"]
            await client.wait(lambda: client.streams[rid].done is not None, within=600)
            stream = client.streams[rid]
            assert stream.done is not None and stream.done["finish_reason"] in ("stop", "length")
            assert len(re.findall(r"[A-Za-z]{2,}", stream.text)) >= 5, stream.text
            assert "sea" in stream.text.lower()
        finally:
            await client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 120)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    database = hashlib.sha256(db_env.encode()).hexdigest()[:12]
    (config.state_dir() / f"dev_api_key.{database}").unlink()
