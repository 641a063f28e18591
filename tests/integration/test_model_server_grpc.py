"""ModelService over real gRPC on loopback, with the synthetic engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.testing.model_server import (
    eventually,
    generate,
    running_server,
    start,
    synthetic_spec,
)
from model_server.engines.synthetic import SyntheticEngine, token_bytes
from model_server.server import ModelServer

MAX_MESSAGE = 256 * 1024

MODELS = [
    synthetic_spec("synthetic", ttft_ms=2, itl_ms=0.5),
    synthetic_spec("slow", ttft_ms=2, itl_ms=20),
    synthetic_spec(
        "tiny", ttft_ms=2, itl_ms=20, max_concurrency=1, max_queue=1, queue_timeout_s=5.0
    ),
    synthetic_spec("queued", ttft_ms=2, itl_ms=20, max_concurrency=1, queue_timeout_s=0.3),
    synthetic_spec(
        "faulty", ttft_ms=2, itl_ms=1, options={"fail_marker": "CRASH", "fail_after": 3}
    ),
    synthetic_spec("small", ttft_ms=1, itl_ms=0.2, max_context=64, max_tokens=100),
]


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[tuple[ModelServer, grpc.aio.Channel]]:
    async with running_server(MODELS, max_message_bytes=MAX_MESSAGE) as (srv, channel):
        yield srv, channel


@pytest.fixture
def stub(server: tuple[ModelServer, grpc.aio.Channel]) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(server[1])


def engine(server: tuple[ModelServer, grpc.aio.Channel], name: str) -> SyntheticEngine:
    eng = server[0].registry.get(name).engine
    assert isinstance(eng, SyntheticEngine)
    return eng


def decode(ids: list[int]) -> str:
    return b"".join(token_bytes(t) for t in ids).decode("utf-8", errors="ignore")


async def test_seq_ordering_and_exactly_one_final(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    res = await generate(stub, start("synthetic", text="Hello", max_tokens=50))
    assert res.code == grpc.StatusCode.OK, res.details
    assert [d.seq for d in res.deltas] == list(range(1, len(res.deltas) + 1))
    fin = res.finish
    assert fin.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert fin.last_seq == len(res.deltas)
    assert fin.usage.prompt_tokens == 5
    assert fin.usage.completion_tokens == len(res.token_ids) == 50
    assert 0 < fin.timings.time_to_first_token_us <= fin.timings.total_us
    assert fin.timings.queue_us <= fin.timings.time_to_first_token_us
    # Text is the UTF-8 of the tokens with nothing lost or invented.
    assert res.text == decode(res.token_ids)
    assert "\ufffd" not in res.text


async def test_utf8_split_across_tokens_is_held_back(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    res = await generate(stub, start("synthetic", text="utf8 please", max_tokens=400))
    ids = res.token_ids
    # The synthetic engine emits multi-byte characters byte by byte: find one.
    split = [i for i, t in enumerate(ids) if t in (0xC3, 0xE2, 0xF0)]
    assert split, "expected a multi-byte character in 400 synthetic tokens"
    for d in res.deltas:
        d.text.encode("utf-8")  # every delta on its own is valid UTF-8
    assert any(ch in res.text for ch in "éü€😀")
    assert res.text == decode(ids)


async def test_cancel_message_stops_the_engine(
    server: tuple[ModelServer, grpc.aio.Channel], stub: model_service_pb2_grpc.ModelServiceStub
) -> None:
    eng = engine(server, "slow")
    res = await generate(
        stub, start("slow", max_tokens=500), cancel_after_deltas=3, cancel_reason="user left"
    )
    assert res.code == grpc.StatusCode.OK
    fin = res.finish
    assert fin.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert fin.message == "user left"
    assert 3 <= len(res.deltas) <= 10  # the cancel is in flight for a token or two
    assert fin.usage.completion_tokens == len(res.token_ids)
    assert eng.active_requests() == frozenset()
    produced = eng.tokens_produced
    await asyncio.sleep(0.1)  # five inter-token intervals
    assert eng.tokens_produced == produced


async def test_rpc_cancellation_aborts_inside_the_engine(
    server: tuple[ModelServer, grpc.aio.Channel], stub: model_service_pb2_grpc.ModelServiceStub
) -> None:
    eng = engine(server, "slow")
    res = await generate(stub, start("slow", max_tokens=500), rpc_cancel_after_deltas=2)
    assert res.code == grpc.StatusCode.CANCELLED
    await eventually(lambda: eng.active_requests() == frozenset())
    handle = server[0].registry.get("slow")
    assert handle.in_flight == 0
    produced = eng.tokens_produced
    await asyncio.sleep(0.1)
    assert eng.tokens_produced == produced


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1234)])
async def test_continuation_equals_uninterrupted_run(
    stub: model_service_pb2_grpc.ModelServiceStub, temperature: float, seed: int | None
) -> None:
    def req(max_tokens: int, cont: list[int] = []) -> model_service_pb2.GenerateStart:  # noqa: B006
        return start(
            "synthetic",
            text="continue me",
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            continuation=cont,
        )

    full = await generate(stub, req(60))
    ids = full.token_ids
    assert len(ids) == 60
    for k in (1, 7, 30, 59):
        head = await generate(stub, req(k))
        assert head.token_ids == ids[:k]
        tail = await generate(stub, req(60, ids[:k]))
        assert tail.code == grpc.StatusCode.OK
        assert tail.token_ids == ids[k:], f"continuation after {k} tokens differs"
        assert tail.deltas[0].seq == 1
        # What a worker would have streamed: the head's text, then the continuation's.
        assert head.text + tail.text == full.text
        assert tail.finish.usage.completion_tokens == 60
        assert tail.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_continuation_that_reached_max_tokens_ends_at_once(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    full = await generate(stub, start("synthetic", max_tokens=10))
    res = await generate(stub, start("synthetic", max_tokens=10, continuation=full.token_ids))
    assert res.deltas == []
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert res.finish.usage.completion_tokens == 10


async def test_32_concurrent_streams_are_isolated(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    starts = [
        start(
            "synthetic",
            text=f"prompt number {i}",
            request_id=f"c{i}",
            max_tokens=20 + i,
            temperature=0.0 if i % 2 else 0.8,
            seed=None if i % 2 else i,
            stop=["."] if i % 5 == 0 else [],
        )
        for i in range(32)
    ]
    solo = [await generate(stub, s) for s in starts]
    together = await asyncio.gather(*(generate(stub, s) for s in starts))
    for i, (a, b) in enumerate(zip(solo, together, strict=True)):
        assert b.code == grpc.StatusCode.OK
        assert b.token_ids == a.token_ids, f"stream {i} differs when run concurrently"
        assert b.text == a.text
        assert [d.seq for d in b.deltas] == list(range(1, len(b.deltas) + 1))
        assert b.finish.finish_reason == a.finish.finish_reason
    assert len({tuple(r.token_ids) for r in together}) == 32


async def test_stop_string_ends_with_stop_and_is_not_streamed(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    full = await generate(stub, start("synthetic", text="stop test", max_tokens=80))
    words = full.text.split(" ")
    stop = " " + words[len(words) // 2]
    cut = full.text.find(stop)
    assert cut > 0
    res = await generate(stub, start("synthetic", text="stop test", max_tokens=80, stop=[stop]))
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_STOP
    assert res.text == full.text[:cut]
    # Tokens up to the one completing the stop string are reported (and counted).
    n = len(res.token_ids)
    assert res.token_ids == full.token_ids[:n]
    assert stop in decode(res.token_ids)
    assert stop not in decode(res.token_ids[:-1])
    assert res.finish.usage.completion_tokens == n


async def test_logprobs_per_token(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    res = await generate(stub, start("synthetic", max_tokens=8, logprobs=2))
    for d in res.deltas:
        assert len(d.logprobs) == len(d.token_ids)
        assert [lp.token_id for lp in d.logprobs] == list(d.token_ids)
        assert all(len(lp.top) == 2 for lp in d.logprobs)


async def test_context_overflow_finishes_with_length(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    prompt = "x" * 40  # 40 tokens; context 64
    res = await generate(stub, start("small", text=prompt, max_tokens=100))
    assert res.code == grpc.StatusCode.OK
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert res.finish.usage.completion_tokens == 24
    assert "context" in res.finish.message


@pytest.mark.parametrize(
    "msg,field",
    [
        (start("synthetic", request_id=""), "start.request_id"),
        (start("synthetic", temperature=3.0), "start.sampling.temperature"),
        (start("synthetic", top_p=0.0), "start.sampling.top_p"),
        (start("synthetic", logprobs=6), "start.sampling.logprobs"),
        (start("synthetic", max_tokens=5000), "start.max_tokens"),
        (start("synthetic", token_ids=[1, 999_999]), "start.prompt.tokens.ids[1]"),
        (start("synthetic", continuation=[10**6]), "start.continuation_token_ids[0]"),
        (start("synthetic", chat=[("wizard", "hi")]), "start.prompt.chat.messages[0].role"),
        (start("synthetic", text=""), "start.prompt.text"),
        (start("synthetic", stop=[""]), "start.sampling.stop[0]"),
        (start("small", text="y" * 64), "start.prompt"),
        (start(""), "start.model"),
    ],
)
async def test_invalid_argument_names_the_field(
    stub: model_service_pb2_grpc.ModelServiceStub,
    msg: model_service_pb2.GenerateStart,
    field: str,
) -> None:
    res = await generate(stub, msg)
    assert res.code == grpc.StatusCode.INVALID_ARGUMENT
    assert res.details.startswith(field + ":"), res.details
    assert res.deltas == [] and res.finishes == []


async def test_first_message_must_be_start(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    call = stub.Generate()
    await call.write(
        model_service_pb2.GenerateRequest(cancel=model_service_pb2.GenerateCancel(reason="x"))
    )
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start" in (err.value.details() or "")


async def test_second_start_is_a_protocol_error(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    call = stub.Generate()
    msg = model_service_pb2.GenerateRequest(start=start("slow", max_tokens=200))
    await call.write(msg)
    await call.write(msg)
    finishes = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for m in call:
            if m.HasField("finish"):
                finishes.append(m.finish)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(finishes) == 1
    assert finishes[0].finish_reason == common_pb2.FINISH_REASON_CANCELLED


async def test_unknown_model_is_not_found(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    res = await generate(stub, start("no-such-model"))
    assert res.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in res.details


async def test_overload_is_resource_exhausted(
    server: tuple[ModelServer, grpc.aio.Channel], stub: model_service_pb2_grpc.ModelServiceStub
) -> None:
    # tiny: 1 slot + 1 queue place. Two long streams fill it; the third is refused.
    long = [
        asyncio.create_task(generate(stub, start("tiny", request_id=f"t{i}", max_tokens=30)))
        for i in range(2)
    ]
    handle = server[0].registry.get("tiny")
    await eventually(lambda: handle.in_flight >= 2)
    third = await generate(stub, start("tiny", request_id="t3", max_tokens=5))
    assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in third.details
    done = await asyncio.gather(*long)
    assert all(r.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH for r in done)
    # The queued one waited for the first: its queue time covers most of the first's run.
    queue_us = sorted(r.finish.timings.queue_us for r in done)
    assert queue_us[1] > 300_000


async def test_queue_timeout_is_resource_exhausted(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    first = asyncio.create_task(generate(stub, start("queued", request_id="q1", max_tokens=40)))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    second = await generate(stub, start("queued", request_id="q2", max_tokens=5))
    assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no decode slot" in second.details
    assert 0.25 < time.monotonic() - t0 < 5.0
    assert (await first).finish.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_engine_failure_sends_final_message_then_internal(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    res = await generate(stub, start("faulty", text="please CRASH now", max_tokens=20))
    assert res.code == grpc.StatusCode.INTERNAL
    assert "fault injected" in res.details
    assert len(res.token_ids) == 3
    fin = res.finish
    assert fin.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert fin.usage.completion_tokens == 3
    assert fin.last_seq == len(res.deltas)
    ok = await generate(stub, start("faulty", text="fine", max_tokens=5))
    assert ok.code == grpc.StatusCode.OK


async def test_oversized_message_is_rejected(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    res = await generate(stub, start("synthetic", text="z" * (MAX_MESSAGE + 1024)))
    assert res.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert res.deltas == []


async def test_list_models_and_tokenize(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    models = {
        m.name: m for m in (await stub.ListModels(model_service_pb2.ListModelsRequest())).models
    }
    assert set(models) == {m.name for m in MODELS}
    assert models["tiny"].max_concurrency == 1
    assert models["small"].max_context == 64
    assert models["synthetic"].engine == "synthetic"
    tok = await stub.Tokenize(
        model_service_pb2.TokenizeRequest(model="synthetic", prompt=common_pb2.Prompt(text="hé"))
    )
    assert list(tok.token_ids) == list("hé".encode())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(
            model_service_pb2.TokenizeRequest(model="nope", prompt=common_pb2.Prompt(text="x"))
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_serving(server: tuple[ModelServer, grpc.aio.Channel]) -> None:
    health = health_pb2_grpc.HealthStub(server[1])
    for name in ("", "llmstream.v1.ModelService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_half_close_does_not_cancel(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    res = await generate(stub, start("slow", max_tokens=6), half_close=True)
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(res.token_ids) == 6
