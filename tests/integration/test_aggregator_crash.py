"""`kill -9` the aggregator (a real `llmstream aggregator` process) at random points while
traffic flows: the bill is still exact — no duplicate, no lost request — and Redis agrees."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis

from llmstream import codec, quota_keys
from llmstream_tools.testing import synthetic_events as synthetic
from llmstream_tools.testing.aggregator import (
    Topics,
    end_offsets,
    new_producer,
    produce,
    stored_offsets,
    wait_caught_up,
)

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("LLMSTREAM_TEST_KILLS", "10"))
REQUESTS = 1000


def start_aggregator(env: dict[str, str], log: Path, replica: int) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "llmstream_tools.cli", "aggregator", "--no-migrate"],
            # Static membership: a restarted replica gets its partitions back without waiting
            # for the killed one's session to expire.
            env={**env, "LLMSTREAM_AGGREGATOR_INSTANCE_ID": f"crash-test-{replica}"},
            stdout=out,
            stderr=out,
        )


def read_logs(folder: Path) -> str:
    return "".join(log.read_text() for log in sorted(folder.glob("aggregator-*.log")))


async def traffic(
    bootstrap: str,
    topics: Topics,
    plans: list[synthetic.RequestPlan],
    client: aioredis.Redis,
    at_ms: int,
    duration_s: float,
) -> int:
    """Produce the requests' events spread over `duration_s`, reserving quota like a gateway."""
    events = list(synthetic.interleaved(plans, topics.prompts, topics.tokens, seed=5))
    pipe = client.pipeline(transaction=False)
    for p in plans:
        pipe.incrby(quota_keys.tokens_day(p.tenant_id, at_ms), p.reserved_tokens)
        pipe.incrby(quota_keys.tokens_month(p.tenant_id, at_ms), p.reserved_tokens)
        # The gateway records each reservation: what its settlement takes back.
        pipe.zadd(quota_keys.reservations(p.tenant_id), {p.request_id: at_ms})
        pipe.hset(quota_keys.reserved(p.tenant_id), p.request_id, p.reserved_tokens)
    await pipe.execute()
    producer = await new_producer(bootstrap)
    chunks = 12
    size = -(-len(events) // chunks)
    try:
        for i in range(chunks):
            await produce(producer, events[i * size : (i + 1) * size])
            await asyncio.sleep(duration_s / chunks)
    finally:
        await producer.stop()
    return len(events)


async def test_kill_dash_nine_never_double_bills_or_loses_a_bill(
    kafka_bootstrap: str,
    topics: Topics,
    db: str,
    redis_url: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:8]
    tenants = [f"tk-{run}-{i}" for i in range(3)]
    plans = [
        synthetic.RequestPlan(**{**p.__dict__, "request_id": f"{run}-{p.request_id}"})
        for p in synthetic.plan(REQUESTS, tenants, ["m"], seed=21, max_tokens=48)
    ]
    group = f"agg-crash-{run}"
    env = {
        **os.environ,
        "LLMSTREAM_DATABASE_URL": db,
        "LLMSTREAM_REDIS_URL": redis_url,
        "LLMSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "LLMSTREAM_TOPIC_PROMPTS": topics.prompts,
        "LLMSTREAM_TOPIC_TOKENS": topics.tokens,
        "LLMSTREAM_TOPIC_DLQ": topics.dlq,
        "LLMSTREAM_AGGREGATOR_GROUP": group,
        "LLMSTREAM_AGGREGATOR_BATCH_MAX": "50",
        "LLMSTREAM_AGGREGATOR_METRICS_PORT": "0",
    }
    at_ms = codec.event_time_ms(codec.new_event("x", "y"))
    rng = random.Random(run)
    producing = asyncio.create_task(
        traffic(kafka_bootstrap, topics, plans, redis_client, at_ms, duration_s=0.7 * KILLS)
    )
    kills = kills_with_backlog = 0
    started = time.monotonic()
    # Two replicas share the partitions (a request's prompts and tokens partitions may belong
    # to different replicas, both writing its row); each round kills one of them.
    logs = [tmp_path / "aggregator-0-0.log", tmp_path / "aggregator-1-0.log"]
    procs = [start_aggregator(env, logs[0], 0), start_aggregator(env, logs[1], 1)]
    try:
        while kills < KILLS:
            await asyncio.sleep(rng.uniform(0.8, 2.2))
            victim = rng.randrange(2)
            assert procs[victim].poll() is None, logs[victim].read_text()[-3000:]
            ends = await end_offsets(kafka_bootstrap, topics.both)
            stored = await stored_offsets(db, group)
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(10)
            kills += 1
            if any(stored.get(k, 0) < v for k, v in ends.items()):
                kills_with_backlog += 1
            logs[victim] = tmp_path / f"aggregator-{victim}-{kills}.log"
            procs[victim] = start_aggregator(env, logs[victim], victim)
        sent = await asyncio.wait_for(producing, 120)
        for _ in range(300):  # both replicas up again (SIGTERM below must find them running)
            if all('"aggregator started"' in log.read_text() for log in logs):
                break
            await asyncio.sleep(0.1)
        await wait_caught_up(kafka_bootstrap, db, group, topics.both, timeout_s=90)
        for _ in range(100):
            async with await psycopg.AsyncConnection.connect(db) as conn:
                cur = await conn.execute("SELECT count(*) FROM quota_outbox")
                row = await cur.fetchone()
            if row and row[0] == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        producing.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    # Graceful shutdown on SIGTERM: exit code 0.
    assert [proc.wait(30) for proc in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    elapsed = time.monotonic() - started
    assert kills == KILLS and sent > 5000 and elapsed < 150
    print(f"kills={kills} with_backlog={kills_with_backlog} events={sent} {elapsed=:.1f}s")
    # Kills must hit a process with work in hand (records fetched or not yet projected), or the
    # test proves little. How many do depends on the machine's pace (4-7 of 10 seen), so this
    # guards the test's power, not the product: at least 3.
    assert kills_with_backlog >= 3, kills_with_backlog

    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT request_id), sum(prompt_tokens),"
            " sum(completion_tokens) FROM usage_ledger"
        )
        count, distinct, prompt, completion = (await cur.fetchone()) or ()
        cur = await conn.execute(
            "SELECT tenant_id, sum(total_tokens) FROM usage_ledger GROUP BY tenant_id"
        )
        by_tenant: dict[str, int] = dict(await cur.fetchall())
        cur = await conn.execute("SELECT count(*) FROM requests WHERE NOT billed")
        unbilled = (await cur.fetchone() or (None,))[0]
        cur = await conn.execute("SELECT sum(requests) FROM usage_daily")
        rolled_up = (await cur.fetchone() or (None,))[0]
    assert count == distinct == REQUESTS  # no duplicate, no skipped request
    assert unbilled == 0 and rolled_up == REQUESTS
    assert prompt == sum(synthetic.used_tokens(p)[0] for p in plans)
    assert completion == sum(synthetic.used_tokens(p)[1] for p in plans)
    for tenant in tenants:
        assert (
            int(await redis_client.get(quota_keys.tokens_day(tenant, at_ms)) or 0)
            == by_tenant[tenant]
        )
        assert (
            int(await redis_client.get(quota_keys.tokens_month(tenant, at_ms)) or 0)
            == by_tenant[tenant]
        )
    # After all that, a rebuild from the log is identical to the projection the crashes left.
    verify = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "llmstream_tools.cli", "replay", "--verify", "--quiet"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(verify.communicate(), 120)
    assert verify.returncode == 0, out.decode()[-2000:] + err.decode()[-2000:]
    assert b"verify: MATCH" in out
    text = read_logs(tmp_path)
    assert "ledger refused duplicate bills" not in text
    # aiokafka logs a heartbeat that meets a newer group generation at error level although it
    # only rejoins (a killed member's session ending mid-rebalance): recoverable, not ours.
    errors = [
        line
        for line in text.splitlines()
        if '"level": "error"' in line and "will rejoin" not in line
    ]
    assert not errors, errors[:5]
