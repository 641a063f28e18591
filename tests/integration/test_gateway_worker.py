"""Gateway end to end with the real worker and a synthetic model server (processes), two
gateway replicas with split partitions, 500 requests over 50 sockets: exact streams (the
model's greedy text), resume across replicas, cancel."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmstream import ports
from llmstream_tools import admin
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing import worker as wt
from llmstream_tools.testing.gateway import Client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = ports.free_port()
    proc = wt.start_model_server(tmp_path_factory.mktemp("gms"), port, itl_ms=5, ttft_ms=5)
    addr = f"127.0.0.1:{port}"
    try:
        asyncio.run(wt.wait_model_server(addr))
        yield addr
    finally:
        proc.kill()


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[wt.Topics]:
    t = await wt.create_topics(kafka_bootstrap)
    yield t
    await wt.delete_topics(t)


async def test_two_replicas_with_real_worker(
    topics: wt.Topics, model_server: str, db_env: str, redis_url: str, tmp_path: Path
) -> None:
    worker = wt.start_worker(tmp_path, topics.env([model_server]), "gw-test-worker")
    gt = testing.Topics(topics.bootstrap, topics.prompts, topics.tokens, topics.partitions)
    sa = testing.settings(gt, redis_url, db_env, "gw-a", [0])
    sb = testing.settings(gt, redis_url, db_env, "gw-b", [1, 2])
    name = f"t-{uuid.uuid4().hex[:8]}"
    await admin.create_tenant(name, "enterprise")
    key = (await admin.create_key(name)).key
    prompt, n = "tell me a story", 40
    try:
        reference, _ids = await wt.reference_text(model_server, prompt, n)
        async with testing.running(sa) as a, testing.running(sb) as b:
            clients = [await Client.connect((sa, sb)[i % 2].port, key) for i in range(50)]
            for c in clients:
                for j in range(10):
                    await c.submit(f"s{j}", max_tokens=n, prompt=prompt, temperature=0)
            # One socket drops mid-stream and resumes everything on the other replica.
            c0 = clients[0]
            rids0 = [(await c0.wait_ref(f"s{j}", 30))["request_id"] for j in range(10)]
            # Mid-stream: at least one token event each (a token event may carry many tokens
            # now that the worker batches naturally; a stream may even be done already).
            await c0.wait(lambda: all(c0.streams[r].tokens for r in rids0), 30)
            await c0.close()
            resumed = await Client.connect(sb.port, key)
            for r in rids0:
                await resumed.send(
                    {"type": "resume", "request_id": r, "after_seq": c0.streams[r].tokens[-1][0]}
                )
            for c in [*clients[1:], resumed]:
                await c.wait(
                    lambda c=c: (
                        len(c.streams) == 10 and all(s.done is not None for s in c.streams.values())
                    ),
                    60,
                )
            for c in clients[1:]:
                for s in c.streams.values():
                    assert [q for q, _ in s.tokens] == list(range(1, len(s.tokens) + 1))
                    assert s.text == reference
                    assert s.done is not None and s.done["finish_reason"] == "length"
            for r in rids0:
                first, rest = c0.streams[r].tokens, resumed.streams[r].tokens
                assert [q for q, _ in first + rest] == list(range(1, len(first + rest) + 1))
                assert "".join(t for _, t in first + rest) == reference
            # Cancel through the real worker.
            c1 = clients[1]
            await c1.submit("long", max_tokens=1000, prompt=prompt)
            rid = (await c1.wait_ref("long"))["request_id"]
            await c1.wait(lambda: len(c1.streams[rid].tokens) >= 2, 20)
            await c1.send({"type": "cancel", "request_id": rid})
            await c1.wait(lambda: c1.streams[rid].done is not None, 20)
            done = c1.streams[rid].done
            assert done is not None and done["finish_reason"] == "cancelled"
            assert a.consumer_assignment() == {0} and b.consumer_assignment() == {1, 2}
            for c in [*clients[1:], resumed]:
                await c.close()
    finally:
        worker.kill()
