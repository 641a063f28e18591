"""The synthetic engine on its own: determinism, pace, abort, queueing."""

from __future__ import annotations

import asyncio
import time

import pytest

from model_server.engines.synthetic import VOCAB_SIZE, SyntheticEngine, next_token, token_bytes
from model_server.errors import EngineError, Overloaded
from model_server.types import EngineRequest, Finish, ModelLimits, Sampling


def req(
    rid: str = "r", n: int = 20, cont: list[int] | None = None, **sampling: object
) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        prompt_token_ids=list(b"prompt"),
        max_new_tokens=n,
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
        continuation_token_ids=cont or [],
        arrival=time.monotonic(),
    )


async def collect(eng: SyntheticEngine, r: EngineRequest) -> tuple[list[int], Finish | None]:
    ids: list[int] = []
    finish = None
    async for step in eng.generate(r):
        ids.extend(step.token_ids)
        finish = step.finish or finish
    return ids, finish


async def engine(**options: float) -> SyntheticEngine:
    limits = ModelLimits(max_concurrency=int(options.pop("slots", 4)), queue_timeout_s=0.2)
    eng = SyntheticEngine({"ttft_ms": 1, "itl_ms": 0, **options}, limits)
    await eng.load()
    return eng


async def test_output_is_a_function_of_prompt_seed_and_position() -> None:
    eng = await engine()
    a, fin = await collect(eng, req(temperature=0.0))
    b, _ = await collect(eng, req(temperature=0.0))
    assert a == b and fin is Finish.LENGTH and len(a) == 20
    s1, _ = await collect(eng, req(temperature=1.0, seed=1))
    s2, _ = await collect(eng, req(temperature=1.0, seed=2))
    assert s1 != s2
    r1, _ = await collect(eng, req(temperature=1.0))
    r2, _ = await collect(eng, req(temperature=1.0))
    assert r1 != r2  # unseeded sampling is random, like a model
    assert all(0 <= t < VOCAB_SIZE for t in a + s1 + r1)
    tail, _ = await collect(eng, req(n=12, cont=a[:8], temperature=0.0))
    assert tail == a[8:]


def test_multibyte_characters_are_complete_sequences() -> None:
    ids = []
    prev = -1
    for i in range(3000):
        prev = next_token(12345, 0, i, prev)
        ids.append(prev)
    text = b"".join(token_bytes(t) for t in ids)
    decoded = text.decode("utf-8", errors="strict" if ids[-1] < 128 or ids[-1] > 255 else "ignore")
    assert any(ch in decoded for ch in "éü€😀")


async def test_pace_follows_ttft_and_itl() -> None:
    eng = await engine(ttft_ms=30, itl_ms=10)
    r = req(n=11)
    times: list[float] = []
    async for step in eng.generate(r):
        times.extend(step.times)
    assert r.scheduled_at is not None
    ttft = times[0] - r.scheduled_at
    assert 0.028 <= ttft < 1.0
    assert times[-1] - r.scheduled_at >= 0.129  # absolute schedule: ttft + 10 gaps of 10 ms
    assert times[-1] - times[0] < 1.0


async def test_abort_while_queued_and_while_running() -> None:
    eng = await engine(slots=1, itl_ms=5)
    running = asyncio.create_task(collect(eng, req("a", n=1000)))
    await asyncio.sleep(0.02)
    queued = asyncio.create_task(collect(eng, req("b", n=5)))
    await asyncio.sleep(0.01)
    assert eng.running == 1 and eng.waiting == 1
    await eng.abort("b")
    ids, fin = await queued
    assert ids == [] and fin is Finish.CANCELLED
    await eng.abort("a")
    ids, fin = await running
    assert fin is Finish.CANCELLED and 0 < len(ids) < 1000
    assert eng.active_requests() == frozenset() and eng.running == 0


async def test_queue_timeout_raises_overloaded() -> None:
    eng = await engine(slots=1, itl_ms=5)
    running = asyncio.create_task(collect(eng, req("a", n=200)))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await collect(eng, req("b", n=5))
    assert eng.waiting == 0
    await eng.abort("a")
    await running


async def test_fault_injection() -> None:
    eng = await engine(fail_marker="BOOM", fail_after=4)  # type: ignore[arg-type]
    r = req(n=10)
    r.prompt_token_ids = list(b"go BOOM")
    got: list[int] = []
    with pytest.raises(EngineError):
        async for step in eng.generate(r):
            got.extend(step.token_ids)
    assert len(got) == 4


# -- zero delay: tokens are produced ahead of the reader and merged ---------------------------


def expected_ids(r: EngineRequest, n: int) -> list[int]:
    from model_server.engines.synthetic import prompt_digest

    digest, prev, out = prompt_digest(r.prompt_token_ids), -1, []
    for i in range(n):
        prev = next_token(digest, 0, i, prev)
        out.append(prev)
    return out


async def test_zero_delay_a_slow_reader_gets_merged_steps_with_every_token_once() -> None:
    eng = await engine(ttft_ms=0)
    r = req(n=200, temperature=0.0, logprobs=2)
    steps = []
    async for step in eng.generate(r):
        steps.append(step)
        for _ in range(5):  # the reader is busy (a write in flight) for a few loop turns
            await asyncio.sleep(0)
    ids = [t for s in steps for t in s.token_ids]
    assert ids == expected_ids(r, 200)
    assert [lp.token_id for s in steps for lp in s.logprobs or []] == ids
    assert len(steps) < 200 and 1 < max(len(s.token_ids) for s in steps) <= eng.max_step_tokens
    assert steps[-1].finish is Finish.LENGTH and all(s.finish is None for s in steps[:-1])
    assert eng.running == 0 and eng.active_requests() == frozenset()


async def test_zero_delay_abort_with_a_slow_reader_ends_cancelled_and_stops_producing() -> None:
    eng = await engine(ttft_ms=0)
    r = req(n=100_000, temperature=0.0)
    got: list[int] = []
    finish = None
    async for step in eng.generate(r):
        got.extend(step.token_ids)
        finish = step.finish
        if len(got) >= 10:  # a no-op once the sequence is gone
            await eng.abort(r.request_id)
        await asyncio.sleep(0)
    assert finish is Finish.CANCELLED and 10 <= len(got) < 100_000
    assert got == expected_ids(r, len(got))
    produced = eng.tokens_produced
    await asyncio.sleep(0.01)
    assert eng.tokens_produced == produced and eng.running == 0


async def test_zero_delay_closing_the_stream_stops_the_producer() -> None:
    eng = await engine(ttft_ms=0, slots=1)
    steps = eng.generate(req(n=100_000))
    await anext(steps)
    await steps.aclose()
    produced = eng.tokens_produced
    await asyncio.sleep(0.01)
    assert eng.tokens_produced == produced and eng.running == 0
    ids, fin = await collect(eng, req("next", n=3))  # the slot is free again
    assert len(ids) == 3 and fin is Finish.LENGTH


async def test_zero_delay_failure_after_merged_tokens_streams_them_first() -> None:
    eng = await engine(ttft_ms=0, fail_marker="BOOM", fail_after=6)  # type: ignore[arg-type]
    r = req(n=50)
    r.prompt_token_ids = list(b"go BOOM")
    got: list[int] = []
    steps = 0
    with pytest.raises(EngineError, match="after 6 tokens"):
        async for step in eng.generate(r):
            steps += 1
            got.extend(step.token_ids)
            for _ in range(20):  # slow enough that all 6 tokens and the failure are merged
                await asyncio.sleep(0)
    assert len(got) == 6 and steps < 6


async def test_zero_delay_steps_stay_bounded_for_a_stalled_reader() -> None:
    eng = await engine(ttft_ms=0, max_step_tokens=4)
    r = req(n=50, temperature=0.0)
    sizes: list[int] = []
    got: list[int] = []
    async for step in eng.generate(r):
        sizes.append(len(step.token_ids))
        got.extend(step.token_ids)
        await asyncio.sleep(0.005)  # the producer runs far ahead, then waits for the reader
    assert got == expected_ids(r, 50)
    assert max(sizes) == 4 and len(sizes) < 50
