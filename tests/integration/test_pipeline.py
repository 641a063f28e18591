"""The whole pipeline, every process real: WebSocket clients -> gateway -> Kafka -> workers ->
synthetic model server (gRPC) -> Kafka -> gateway -> clients, and the aggregator folding the
log into PostgreSQL and Redis while it is `kill -9`ed again and again.

Checks the platform's promises end to end: every request gets seq 1..n once and one `done`;
the ledger has exactly one row per terminal event in the log, with the same token sums; Redis
quota counters equal the ledger; the projection rebuilt from the log matches the live one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
import websockets

from llmstream import quota_keys
from llmstream.fold import TERMINAL, fold_all
from llmstream_tools.stack import Stack, local_stack
from llmstream_tools.testing.worker import read_all

pytestmark = pytest.mark.integration

SOCKETS = 10
PER_SOCKET = 100
MAX_TOKENS = 12
# Open requests per socket: 10 x 40 stays under the enterprise tier's 512 concurrent streams.
WINDOW = 40


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    # A database of this test alone: `replay --verify` compares whole tables, so rows of
    # other tests' requests in a shared database would be (rightly) reported as differences.
    async with local_stack(tmp_path) as s:
        yield s


@dataclass
class Outcome:
    seqs: list[int] = field(default_factory=list)
    text: str = ""
    done: dict[str, object] | None = None


async def client(port: int, key: str, n: int, outcomes: dict[str, Outcome]) -> None:
    """Closed loop: keeps WINDOW requests open on one socket until n are done."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {key}"},
        max_size=None,
        open_timeout=20,
    ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 20))
        assert hello["type"] == "hello"
        sent = 0

        async def submit() -> None:
            nonlocal sent
            sent += 1
            await ws.send(
                json.dumps(
                    {
                        "type": "submit",
                        "model": "synthetic",
                        "prompt": f"pipeline {sent} {uuid.uuid4().hex[:6]}",
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                    }
                )
            )

        for _ in range(min(WINDOW, n)):
            await submit()
        finished = 0
        while finished < n:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            kind = frame["type"]
            if kind == "accepted":
                outcomes.setdefault(frame["request_id"], Outcome())
            elif kind == "token":
                out = outcomes.setdefault(frame["request_id"], Outcome())
                out.seqs.append(frame["seq"])
                out.text += frame["text"]
            elif kind == "done":
                outcomes[frame["request_id"]].done = frame
                finished += 1
                if sent < n:
                    await submit()
            elif kind == "error":
                raise AssertionError(f"error frame: {frame}")


async def test_thousand_requests_bill_exactly_once_through_aggregator_crashes(
    stack: Stack, kafka_bootstrap: str, redis_url: str
) -> None:
    tenant_id, key = await stack.tenant_key("enterprise")

    outcomes: dict[str, Outcome] = {}
    traffic = asyncio.gather(
        *(client(stack.gateway_port, key, PER_SOCKET, outcomes) for _ in range(SOCKETS))
    )
    # Crash the aggregator at random points while the traffic flows.
    kills = 0
    while not traffic.done() and kills < 10:
        await asyncio.sleep(0.4 + (kills % 3) * 0.3)
        stack.kill("aggregator")
        kills += 1
        stack.start("aggregator")
    await asyncio.wait_for(traffic, 180)
    assert kills >= 3, "traffic ended before the aggregator could be killed"

    # Every client saw every token exactly once, in order, and one terminal frame.
    assert len(outcomes) == SOCKETS * PER_SOCKET
    for rid, out in outcomes.items():
        assert out.done is not None, rid
        assert out.seqs == list(range(1, len(out.seqs) + 1)), rid
        assert out.done["last_seq"] == len(out.seqs)
        assert out.done["finish_reason"] in ("length", "stop")

    # The log: one terminal event per request.
    events = await read_all(kafka_bootstrap, stack.tokens_topic)
    events += await read_all(kafka_bootstrap, stack.prompts_topic)
    states = fold_all(events)
    terminal = {rid: s for rid, s in states.items() if s.status in TERMINAL}
    assert set(terminal) == set(outcomes)
    assert all(s.extra_terminals == 0 and s.missing_seqs == 0 for s in terminal.values())
    for rid, out in outcomes.items():
        assert terminal[rid].text == out.text

    # The projection catches up: exactly one ledger row per terminal event, same sums.
    deadline = time.monotonic() + 90
    while True:
        async with await psycopg.AsyncConnection.connect(stack.database_url) as conn:
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT request_id), coalesce(sum(prompt_tokens), 0),"
                " coalesce(sum(completion_tokens), 0), coalesce(sum(total_tokens), 0)"
                " FROM usage_ledger WHERE tenant_id = %s",
                (tenant_id,),
            )
            row = await cur.fetchone()
        assert row is not None
        if row[0] >= len(terminal) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    rows, distinct, prompt_sum, completion_sum, total_sum = row
    assert rows == distinct == len(terminal)
    assert prompt_sum == sum(s.prompt_tokens for s in terminal.values())
    assert completion_sum == sum(s.completion_tokens for s in terminal.values())
    done_usage = [out.done["usage"] for out in outcomes.values() if out.done]
    assert completion_sum == sum(u["completion_tokens"] for u in done_usage)  # type: ignore[index]

    # Redis: reservations were replaced by usage, once per request.
    r = aioredis.from_url(redis_url, socket_timeout=5)
    try:
        deadline = time.monotonic() + 30
        now_ms = int(time.time() * 1000)
        while True:
            day = int(await r.get(quota_keys.tokens_day(tenant_id, now_ms)) or 0)
            streams = await r.zcard(quota_keys.streams(tenant_id))
            if (day == total_sum and streams == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert day == total_sum
        assert streams == 0
    finally:
        await r.aclose()

    # The database is a projection of the log: a rebuild from Kafka matches it.
    verify = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmstream_tools.cli", "replay", "--verify",
        env=stack.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out_b, err_b = await asyncio.wait_for(verify.communicate(), 120)
    assert verify.returncode == 0, (out_b + err_b).decode()[-2000:]
