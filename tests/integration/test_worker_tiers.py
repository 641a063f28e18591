"""Workers trust no submit blindly (issue 17): forged `submitted` events produced straight into
Kafka, past any gateway, against a real worker process with its tier check on (tenants and
tiers in a fresh PostgreSQL database), a real synthetic model server, and the real aggregator
billing what the log says. And a dead-lettered submit that still names its request ends with a
terminal event its client sees."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from aggregator.service import Aggregator, Settings
from llmstream.ports import free_port
from llmstream.v1 import events_pb2
from llmstream_tools import admin
from llmstream_tools.testing.aggregator import wait_caught_up
from llmstream_tools.testing.worker import (
    Proc,
    Topics,
    cancel_event,
    collect,
    produce,
    read_all,
    start_worker,
    submit_event,
    wait_assigned,
)
from llmstream_tools.testing.worker_fixtures import (
    synthetic_model_server,
    worker_procs,
    worker_topics,
)

pytestmark = pytest.mark.integration
topics = worker_topics
procs = worker_procs


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with synthetic_model_server(tmp_path_factory.mktemp("ms"), itl_ms=1, ttft_ms=1) as addr:
        yield addr


def forged(
    tenant_id: str, max_tokens: int, reply: Topics, partition: int = 0, text: str = "hello world"
) -> events_pb2.Event:
    """A submit as a gateway writes it (estimate and reservation consistent) unless changed."""
    ev = submit_event(f"r-{uuid.uuid4().hex[:12]}", text, max_tokens, reply.tokens, partition)
    ev.tenant_id = tenant_id
    ev.submitted.estimated_prompt_tokens = len(text) // 4 + 1
    ev.submitted.reserved_tokens = ev.submitted.estimated_prompt_tokens + max_tokens
    return ev


async def billed_rows(db: str, ids: list[str]) -> dict[str, tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute(
            "SELECT request_id, status, error_code, prompt_tokens, completion_tokens, billed"
            " FROM requests WHERE request_id = ANY(%s)",
            (ids,),
        )
        return {str(r[0]): tuple(r[1:]) for r in await cur.fetchall()}


async def project(topics: Topics, db: str, redis_url: str) -> None:
    """The aggregator, in process, until it has stored everything the topics hold."""
    settings = Settings(
        bootstrap=topics.bootstrap,
        database_url=db,
        redis_url=redis_url,
        topics=[topics.prompts, topics.tokens],
        group=f"agg-{uuid.uuid4().hex[:8]}",
        dlq_topic=topics.dlq,
        session_timeout_ms=6000,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(Aggregator(settings).run(stop))
    try:
        await wait_caught_up(
            topics.bootstrap, db, settings.group, [topics.prompts, topics.tokens], timeout_s=90
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_submits_beyond_the_tier_end_failed_unbilled(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path, db: str, redis_url: str
) -> None:
    run = uuid.uuid4().hex[:8]
    free = await admin.create_tenant(f"free-{run}", "free", database_url=db)  # 512 per request
    disabled = await admin.create_tenant(f"off-{run}", "enterprise", database_url=db)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute("UPDATE tenants SET disabled_at = now() WHERE id = %s", (disabled,))
    env = topics.env([model_server], LLMSTREAM_WORKER_TIER_CHECK="1", LLMSTREAM_DATABASE_URL=db)
    procs.append(start_worker(tmp_path, env, "w0"))
    await wait_assigned(procs, topics.partitions)

    within = forged(free, 20, topics)
    too_many = forged(free, 100_000, topics)  # the free tier allows 512
    unbounded = forged(free, 0, topics)
    huge_reservation = forged(free, 20, topics)
    huge_reservation.submitted.reserved_tokens = 2_000_000_000  # would credit the tenant back
    inflated_estimate = forged(free, 20, topics, text="hi")
    inflated_estimate.submitted.estimated_prompt_tokens = 1_000_000
    inflated_estimate.submitted.reserved_tokens = 1_000_020
    nobody = forged(f"t_nobody_{run}", 20, topics)
    off = forged(disabled, 20, topics)
    events = [within, too_many, unbounded, huge_reservation, inflated_estimate, nobody, off]
    await produce(topics.bootstrap, topics.prompts, events)
    ids = [e.request_id for e in events]
    got = await collect(topics.bootstrap, topics.tokens, ids)

    served = got.check_contract(within.request_id)
    assert (served.status, served.finish_reason, len(served.token_ids)) == (
        "completed",
        "length",
        20,
    )
    expected = {
        too_many.request_id: ("limit_exceeded", "max_tokens 100000 exceeds the free tier's 512"),
        unbounded.request_id: (
            "limit_exceeded",
            "max_tokens unbounded exceeds the free tier's 512",
        ),
        huge_reservation.request_id: (
            "limit_exceeded",
            "reserved_tokens 2000000000 is not estimated_prompt_tokens 3 + max_tokens 20",
        ),
        inflated_estimate.request_id: (
            "limit_exceeded",
            "estimated_prompt_tokens 1000000 exceeds what the prompt can hold (3)",
        ),
        nobody.request_id: ("unknown_tenant", f"tenant 't_nobody_{run}' does not exist"),
        off.request_id: ("unknown_tenant", f"tenant {disabled!r} is disabled"),
    }
    for rid, (code, message) in expected.items():
        st = got.check_contract(rid)
        assert (st.status, st.error_code, st.finish_message) == ("failed", code, message)
        # Never generated: no `started`, no token, nothing asked of the model server.
        kinds = [e.WhichOneof("body") for e in got.events[rid]]
        assert kinds == ["failed"], (rid, kinds)

    # Billing follows the log: the refused requests cost nothing; the served one its usage.
    await project(topics, db, redis_url)
    rows = await billed_rows(db, ids)
    # The synthetic engine counts one prompt token per byte of "hello world".
    assert rows[within.request_id] == ("completed", None, 11, 20, True)
    for rid, (code, _message) in expected.items():
        assert rows[rid][:4] == ("failed", code, 0, 0), rows[rid]
    # Billed (settled at zero) where the tenant exists; the unknown tenant's is billed too.
    assert all(rows[rid][4] for rid in expected)


async def test_dead_lettered_submit_ends_failed_for_its_client(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path, db: str, redis_url: str
) -> None:
    tenant = await admin.create_tenant(f"dlq-{uuid.uuid4().hex[:8]}", "standard", database_url=db)
    env = topics.env([model_server], LLMSTREAM_WORKER_TIER_CHECK="1", LLMSTREAM_DATABASE_URL=db)
    procs.append(start_worker(tmp_path, env, "w0"))
    await wait_assigned(procs, topics.partitions)
    # A gateway configured with another tokens topic: the worker dead-letters its submits.
    wrong_topic = forged(tenant, 10, topics, partition=2)
    wrong_topic.submitted.reply.topic = "llmstream.tokens.elsewhere"
    # A submit whose reply partition no gateway owns: DLQ only (nobody waits on it).
    no_route = forged(tenant, 10, topics, partition=9)
    ok = forged(tenant, 10, topics, partition=1)
    await produce(topics.bootstrap, topics.prompts, [wrong_topic, no_route, ok])
    got = await collect(topics.bootstrap, topics.tokens, [wrong_topic.request_id, ok.request_id])

    assert got.check_contract(ok.request_id).status == "completed"
    st = got.check_contract(wrong_topic.request_id)
    assert (st.status, st.error_code) == ("failed", "dead_lettered")
    assert st.finish_message == (
        "the request could not be processed: reply topic 'llmstream.tokens.elsewhere' is not "
        f"the tokens topic {topics.tokens!r}"
    )
    assert got.partitions[wrong_topic.request_id] == {2}  # where its gateway watches
    assert [e.WhichOneof("body") for e in got.events[wrong_topic.request_id]] == ["failed"]

    await project(topics, db, redis_url)  # the worker's offsets are committed meanwhile too
    rows = await billed_rows(db, [wrong_topic.request_id, no_route.request_id])
    assert rows[wrong_topic.request_id] == ("failed", "dead_lettered", 0, 0, True)
    # The unroutable one never ends: no terminal anywhere (the reservation reaper's case).
    assert no_route.request_id not in {
        e.request_id for e in await read_all(topics.bootstrap, topics.tokens)
    }
    assert rows[no_route.request_id][0] == "queued"


async def test_postgres_unreachable_never_fails_open(
    topics: Topics, model_server: str, procs: list[Proc], tmp_path: Path
) -> None:
    """Nothing cached and PostgreSQL unreachable: the submit waits for its tier (asking again
    with backoff) and, when its wall time is spent, ends `tier_unavailable` without a model
    call; a cancel meanwhile ends it `cancelled`."""
    unreachable = f"postgresql://llmstream@127.0.0.1:{free_port()}/llmstream"
    env = topics.env(
        [model_server], LLMSTREAM_WORKER_TIER_CHECK="1", LLMSTREAM_DATABASE_URL=unreachable
    )
    procs.append(start_worker(tmp_path, env, "w0"))
    await wait_assigned(procs, topics.partitions)
    timed = forged("t_any", 10, topics)
    timed.submitted.timeout_ms = 1500
    cancelled = forged("t_any", 10, topics)
    await produce(topics.bootstrap, topics.prompts, [timed, cancelled])
    await produce(topics.bootstrap, topics.prompts, [cancel_event(cancelled.request_id)])
    got = await collect(topics.bootstrap, topics.tokens, [timed.request_id, cancelled.request_id])
    st = got.check_contract(timed.request_id)
    assert (st.status, st.error_code) == ("failed", "tier_unavailable")
    assert st.finish_message.startswith(
        "the tenant's tier could not be read: PostgreSQL did not answer"
    )
    assert [e.WhichOneof("body") for e in got.events[timed.request_id]] == ["failed"]
    st = got.check_contract(cancelled.request_id)
    assert (st.status, st.finish_reason) == ("cancelled", "cancelled")
    assert [e.WhichOneof("body") for e in got.events[cancelled.request_id]] == ["completed"]
    assert "PostgreSQL unreachable: the request waits for its tier" in procs[0].log()
