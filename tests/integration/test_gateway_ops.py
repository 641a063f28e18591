"""Gateway operations: load shedding, heartbeats, SIGTERM drain of the real process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.quota import Quota
from llmstream import ports
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration


topics = testing.topics_fixture(2)


async def new_key() -> str:
    return (await testing.new_tenant("enterprise"))[2]


async def test_load_shedding_caps_then_refuses(topics: Topics, db_env: str, redis_url: str) -> None:
    s = testing.settings(
        topics, redis_url, db_env, "gw-o", [0, 1], max_inflight=2, shed_max_tokens=10
    )
    key = await new_key()
    async with testing.running(s), FakeWorker(topics, itl_s=0.05):
        c = await Client.connect(s.port, key)
        await c.submit("a", max_tokens=50)
        first = await c.wait_ref("a")
        assert first["max_tokens"] == 50 and "max_tokens_capped" not in first
        await c.submit("b", max_tokens=50)
        second = await c.wait_ref("b")
        assert second["max_tokens"] == 10 and second["max_tokens_capped"] == "load"
        await c.submit("c", max_tokens=50)
        third = await c.wait_ref("c")
        assert third["type"] == "error" and third["code"] == "overloaded"
        assert third["retry_after_ms"] > 0
        rid_b = second["request_id"]
        await c.wait(lambda: c.streams[rid_b].done is not None)
        await c.submit("d", max_tokens=5)
        assert (await c.wait_ref("d"))["type"] == "accepted"
        await c.close()


async def test_a_submit_failing_inside_the_gateway_gets_an_error_with_its_client_ref(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-o", [0, 1])
    key = await new_key()
    async with testing.running(s) as gw:
        c = await Client.connect(s.port, key)
        # Quota checks now go to a port where no Redis listens: the submit fails inside.
        dead = aioredis.Redis(port=ports.free_port(), socket_connect_timeout=1)
        gw.admission.quota = Quota(dead)
        await c.submit("lost", max_tokens=5)
        err = await c.wait_ref("lost")
        assert (err["type"], err["code"], err["retry_after_ms"]) == ("error", "internal", 1000)
        await c.close()
        await dead.aclose()


async def test_idle_socket_gets_heartbeats(topics: Topics, db_env: str, redis_url: str) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-o", [0, 1], heartbeat_s=0.2)
    key = await new_key()
    async with testing.running(s):
        c = await Client.connect(s.port, key)
        await c.wait(lambda: sum(f["type"] == "heartbeat" for f in c.frames) >= 2, 5)
        await c.close()


async def test_sigterm_drains_with_1012(
    topics: Topics, db_env: str, redis_url: str, tmp_path: Path
) -> None:
    key = await new_key()
    port = ports.free_port()
    env = dict(os.environ)
    env.update(
        {
            "LLMSTREAM_TOPIC_PROMPTS": topics.prompts,
            "LLMSTREAM_TOPIC_TOKENS": topics.tokens,
            "LLMSTREAM_REDIS_URL": redis_url,
            "LLMSTREAM_GATEWAY_DRAIN_S": "3",
        }
    )
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "llmstream"),
        "gateway",
        "--port",
        str(port),
        "--partitions",
        "0-1",
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        for _ in range(150):
            try:
                await asyncio.to_thread(
                    urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz", timeout=1
                )
                break
            except OSError:
                await asyncio.sleep(0.1)
        c = await Client.connect(port, key)
        await c.wait(lambda: c.hello is not None)
        proc.send_signal(signal.SIGTERM)
        await c.wait(lambda: c.close_code is not None, 10)
        assert c.close_code == 1012
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def test_prompt_lag_refuses_new_submits(topics: Topics, db_env: str, redis_url: str) -> None:
    """No worker runs: prompts pile up; past the lag bound, submits are refused `overloaded`."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    s = testing.settings(
        topics,
        redis_url,
        db_env,
        "gw-o",
        [0, 1],
        max_prompt_lag=3,
        worker_group=group,
        lag_interval_s=0.1,
    )
    key = await new_key()
    async with testing.running(s) as gw:
        c = await Client.connect(s.port, key)
        for i in range(3):
            await c.submit(f"a{i}", max_tokens=5)
            assert (await c.wait_ref(f"a{i}"))["type"] == "accepted"
        for _ in range(50):
            if gw.prompt_lag >= 3:
                break
            await asyncio.sleep(0.1)
        assert gw.prompt_lag == 3
        await c.submit("late", max_tokens=5)
        refused = await c.wait_ref("late")
        assert refused["code"] == "overloaded" and refused["retry_after_ms"] > 0
        await c.close()
