"""`llmstream replay` on real Kafka + PostgreSQL: rebuild + verify against a live aggregator,
a deliberate mismatch, one request's history, and time-based starts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid

import psycopg
import pytest

from aggregator import replay
from aggregator.service import Aggregator, Settings
from llmstream_tools.testing import synthetic_events as synthetic
from llmstream_tools.testing.aggregator import (
    Topics,
    end_offsets,
    new_producer,
    produce,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


def plans_for(run: str, n: int, seed: int) -> list[synthetic.RequestPlan]:
    return [
        synthetic.RequestPlan(**{**p.__dict__, "request_id": f"{run}-{p.request_id}"})
        for p in synthetic.plan(n, [f"tr-{run}-a", f"tr-{run}-b"], ["m"], seed=seed)
    ]


async def send(bootstrap: str, topics: Topics, plans: list[synthetic.RequestPlan]) -> int:
    producer = await new_producer(bootstrap)
    try:
        return await produce(producer, synthetic.interleaved(plans, topics.prompts, topics.tokens))
    finally:
        await producer.stop()


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmstream_tools.cli",
        "replay",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def env_for(bootstrap: str, db: str, topics: Topics, group: str = "") -> dict[str, str]:
    return {
        **os.environ,
        "LLMSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "LLMSTREAM_DATABASE_URL": db,
        "LLMSTREAM_TOPIC_PROMPTS": topics.prompts,
        "LLMSTREAM_TOPIC_TOKENS": topics.tokens,
        "LLMSTREAM_AGGREGATOR_GROUP": group,
    }


async def test_rebuild_verify_matches_live_projection_and_reports_tampering(
    kafka_bootstrap: str, topics: Topics, db: str, redis_url: str
) -> None:
    run = uuid.uuid4().hex[:8]
    group = f"agg-replay-{run}"
    await send(kafka_bootstrap, topics, plans_for(run, 300, seed=1))
    agg = Aggregator(
        Settings(
            bootstrap=kafka_bootstrap,
            database_url=db,
            redis_url=redis_url,
            topics=topics.both,
            group=group,
            batch_max=400,
            session_timeout_ms=6000,
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agg.run(stop))
    env = env_for(kafka_bootstrap, db, topics, group)
    try:
        await wait_caught_up(kafka_bootstrap, db, group, topics.both)
        code, out, err = await cli(env, "--verify", "--schema", f"rb_{run}")
        assert code == 0, out + err
        assert "verify: MATCH" in out
        summary = json.loads(err.strip().splitlines()[-1])
        assert summary["bills"] == 300 and summary["differences"] == 0

        # Traffic keeps flowing while a second verify runs: the live side is read in the
        # snapshot of its offsets, so it still matches.
        more = asyncio.create_task(send(kafka_bootstrap, topics, plans_for(run + "x", 300, 2)))
        code, out, err = await cli(env, "--verify", "--schema", f"rb_{run}")
        await more
        assert code == 0, out + err
        await wait_caught_up(kafka_bootstrap, db, group, topics.both)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(
            "UPDATE requests SET completion_tokens = completion_tokens + 1"
            " WHERE request_id = (SELECT min(request_id) FROM requests) RETURNING request_id"
        )
        tampered = ((await cur.fetchone()) or ("",))[0]
        await conn.execute("DELETE FROM usage_daily WHERE tenant_id = %s", (f"tr-{run}-b",))
    code, out, err = await cli(env, "--verify", "--schema", f"rb_{run}")
    assert code == 1, out + err
    assert f"DIFF requests {tampered}: completion_tokens" in out
    assert "usage_daily" in out and "row in rebuild only" in out
    assert "verify: 2 DIFFERENCES" in out
    # Without a live projection for the group, verify refuses (exit 2), it does not "match".
    code, out, err = await cli(env_for(kafka_bootstrap, db, topics, "nobody"), "--verify")
    assert code == 2 and "no live projection" in err


async def test_replay_one_request_shows_its_full_history(
    kafka_bootstrap: str, topics: Topics
) -> None:
    run = uuid.uuid4().hex[:8]
    plans = plans_for(run, 40, seed=3)
    await send(kafka_bootstrap, topics, plans)
    target = next(p for p in plans if p.outcome == "stop" and p.n_tokens >= 5)
    expected = synthetic.events_of(target, topics.prompts, topics.tokens)
    env = env_for(kafka_bootstrap, "", topics)

    code, out, err = await cli(env, "--request-id", target.request_id, "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    history, state = lines[:-1], lines[-1]["state"]
    assert len(history) == len(expected)
    kinds = [next(k for k in h["event"] if k in _KINDS) for h in history]
    assert kinds[0] == "submitted" and kinds[1] == "started" and kinds[-1] == "completed"
    assert kinds.count("token_delta") == sum(1 for e in expected if e.event.HasField("token_delta"))
    assert all(h["event"]["request_id"] == target.request_id for h in history)
    assert state["status"] == "completed" and state["completion_tokens"] == target.n_tokens
    assert state["text"] == "".join(f" t{s}" for s in range(1, target.n_tokens + 1))

    code, out, _ = await cli(env, "--request-id", target.request_id)
    assert code == 0 and "submitted" in out and "status: completed" in out
    code, _, err = await cli(env, "--request-id", "no-such-request")
    assert code == 1 and "no event" in err

    code, out, _ = await cli(env)  # table of all requests
    assert code == 0
    rows = out.splitlines()
    assert rows[0].split()[:4] == ["request_id", "tenant", "model", "status"]
    assert len(rows) == 1 + len(plans)


async def test_follow_prints_requests_as_they_finish(kafka_bootstrap: str, topics: Topics) -> None:
    run = uuid.uuid4().hex[:8]
    env = env_for(kafka_bootstrap, "", topics)
    await send(kafka_bootstrap, topics, plans_for(run + "old", 5, 6))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmstream_tools.cli",
        "replay",
        "--follow",
        "--json",
        "--from-offset",
        "999999999",  # clipped to the end: only new requests
        "--quiet",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(2.0)  # let it position itself at the end
        fresh = plans_for(run + "new", 3, 7)
        await send(kafka_bootstrap, topics, fresh)
        assert proc.stdout is not None
        seen = set()
        for _ in fresh:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            seen.add(json.loads(line)["request_id"])
        assert seen == {p.request_id for p in fresh}
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0


_KINDS = {"submitted", "cancel_requested", "started", "token_delta", "completed", "failed"}


async def test_replay_from_time_starts_at_the_right_offset(
    kafka_bootstrap: str, topics: Topics
) -> None:
    run = uuid.uuid4().hex[:8]
    first, second = plans_for(run + "a", 30, 4), plans_for(run + "b", 30, 5)
    await send(kafka_bootstrap, topics, first)
    boundary = await end_offsets(kafka_bootstrap, topics.both)
    await asyncio.sleep(1.0)
    cut_ms = int(time.time() * 1000)
    await asyncio.sleep(0.2)
    await send(kafka_bootstrap, topics, second)

    consumer = replay.new_consumer(kafka_bootstrap)
    await consumer.start()
    try:
        tps = await replay.partitions(consumer, topics.both)
        ranges = await replay.resolve(consumer, tps, replay.Start(time_ms=cut_ms), follow=False)
    finally:
        await consumer.stop()
    assert {(r.tp.topic, r.tp.partition): r.start for r in ranges} == boundary

    env = env_for(kafka_bootstrap, "", topics)
    code, out, err = await cli(env, "--from-time", str(cut_ms), "--json", "--no-text")
    assert code == 0, err
    seen = {json.loads(line)["request_id"] for line in out.splitlines()}
    assert seen == {p.request_id for p in second}
    # ISO 8601 and relative forms are accepted too.
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cut_ms / 1000 - 3600)) + "Z"
    code, out, _ = await cli(env, "--from-time", iso, "--json", "--no-text")
    assert code == 0 and len(out.splitlines()) == len(first) + len(second)
    code, out, _ = await cli(env, "--from-offset", "999999", "--json")
    assert code == 0 and out == ""
