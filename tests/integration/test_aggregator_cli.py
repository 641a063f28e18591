"""`llmstream aggregator` as an operator runs it: /metrics, SIGTERM, --rebuild-quota."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
import uuid

import pytest
import redis.asyncio as aioredis

from llmstream import codec, quota_keys
from llmstream.ports import free_port
from llmstream_tools.testing import synthetic_events as synthetic
from llmstream_tools.testing.aggregator import (
    Topics,
    new_producer,
    produce,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def value(text: str, family: str, label: str = "") -> float:
    """Sum of a family's samples (optionally those carrying `label`) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == family and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_graceful_stop_and_quota_rebuild(
    kafka_bootstrap: str,
    topics: Topics,
    db: str,
    redis_url: str,
    redis_client: aioredis.Redis,
) -> None:
    run = uuid.uuid4().hex[:6]
    tenant = f"tc-{run}"
    plans = [
        synthetic.RequestPlan(**{**p.__dict__, "request_id": f"{run}-{p.request_id}"})
        for p in synthetic.plan(30, [tenant], ["m"], seed=12)
    ]
    producer = await new_producer(kafka_bootstrap)
    try:
        await produce(producer, synthetic.interleaved(plans, topics.prompts, topics.tokens))
        await producer.send_and_wait(topics.tokens, b"\x00not an event", key=b"junk")
    finally:
        await producer.stop()
    port = free_port()
    group = f"agg-cli-{run}"
    env = {
        **os.environ,
        "LLMSTREAM_DATABASE_URL": db,
        "LLMSTREAM_REDIS_URL": redis_url,
        "LLMSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "LLMSTREAM_TOPIC_PROMPTS": topics.prompts,
        "LLMSTREAM_TOPIC_TOKENS": topics.tokens,
        "LLMSTREAM_TOPIC_DLQ": topics.dlq,
        "LLMSTREAM_AGGREGATOR_GROUP": group,
        "LLMSTREAM_AGGREGATOR_METRICS_PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmstream_tools.cli",
        "aggregator",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_caught_up(kafka_bootstrap, db, group, topics.both)
        text = ""
        for _ in range(50):
            text = await asyncio.to_thread(scrape, port)
            # Lag series appear once the consumer knows each partition's high watermark.
            if "llmstream_aggregator_bills_total" in text and "lag_events{" in text:
                break
            await asyncio.sleep(0.1)
        assert value(text, "llmstream_aggregator_bills_total") == 30
        assert value(text, "llmstream_aggregator_bad_events_total", 'reason="undecodable"') == 1
        assert value(text, "llmstream_aggregator_dead_letters_total", 'result="sent"') == 1
        assert value(text, "llmstream_aggregator_events_total") > 30
        assert "llmstream_aggregator_lag_events" in text
        assert "llmstream_aggregator_lag_seconds" in text
        assert "llmstream_aggregator_batch_duration_seconds_bucket" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    final = [e for e in lines if e["msg"] == "aggregator stopped"]
    assert final and final[-1]["bills"] == 30 and final[-1]["bad_events"] == 1
    bad = next(e for e in lines if e["msg"] == "bad event")
    assert bad["reason"] == "undecodable" and bad["topic"] == topics.tokens
    assert isinstance(bad["offset"], int)

    # Redis lost: rebuild the current windows from PostgreSQL.
    at = codec.event_time_ms(codec.new_event("x", "y"))
    await redis_client.delete(
        quota_keys.tokens_day(tenant, at), quota_keys.tokens_month(tenant, at)
    )
    rebuild = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmstream_tools.cli",
        "aggregator",
        "--rebuild-quota",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(rebuild.communicate(), 60)
    assert rebuild.returncode == 0, err.decode()
    assert json.loads(out.decode().strip().splitlines()[-1])["rebuilt"]["tenants"] >= 1
    used = sum(sum(synthetic.used_tokens(p)) for p in plans)
    assert int(await redis_client.get(quota_keys.tokens_day(tenant, at)) or 0) == used
    assert int(await redis_client.get(quota_keys.tokens_month(tenant, at)) or 0) == used
