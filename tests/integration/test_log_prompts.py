"""Prompt text reaches the logs only with LLMSTREAM_LOG_PROMPTS=1 (a real in-process gateway,
real Kafka/Redis/PostgreSQL, a fake worker)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from llmstream import telemetry
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    t = await testing.create_topics(kafka_bootstrap, partitions=2)
    yield t
    await testing.delete_topics(t)


class Lines(logging.Handler):
    """The gateway's log lines as the services write them (JSON, formatted at emit time so
    the request's log context is in them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(telemetry.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines() -> Iterator[Lines]:
    logger = logging.getLogger("gateway")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("opt_in", [False, True])
async def test_prompt_text_is_logged_only_when_opted_in(
    opt_in: bool,
    topics: Topics,
    db_env: str,
    redis_url: str,
    lines: Lines,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if opt_in:
        monkeypatch.setenv("LLMSTREAM_LOG_PROMPTS", "1")
    else:
        monkeypatch.delenv("LLMSTREAM_LOG_PROMPTS", raising=False)
    tenant_id, _name, key = await testing.new_tenant()
    secret = f"confidential {uuid.uuid4().hex}"
    s = testing.settings(topics, redis_url, db_env, f"gw-{uuid.uuid4().hex[:6]}", [0, 1])
    async with testing.running(s), FakeWorker(topics):
        c = await Client.connect(s.port, key)
        await c.submit("r", max_tokens=2, prompt=secret)
        await c.wait(lambda: any(st.done for st in c.streams.values()))
        await c.close()
    request_id = c.by_ref["r"]["request_id"]
    logged = [json.loads(line) for line in lines.lines]
    prompts = [e for e in logged if e["msg"] == "prompt"]
    if not opt_in:
        assert prompts == []
        assert not any(secret in line for line in lines.lines)
        return
    assert len(prompts) == 1
    entry = prompts[0]
    assert entry["prompt"] == secret and entry["model"] == "synthetic"
    assert entry["request_id"] == request_id and entry["tenant_id"] == tenant_id
    assert entry["service"] and entry["level"] == "info"
    assert key not in json.dumps(logged)  # never the API key
