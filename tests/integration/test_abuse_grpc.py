"""Abuse of the model server's gRPC API (real gRPC on loopback, synthetic engine): messages that
are not protobuf, oversized messages, and Hypothesis-generated `GenerateStart`s with invalid
sampling parameters, prompts, ids and limits. Every call ends with a clear status
(INVALID_ARGUMENT naming the field, NOT_FOUND, RESOURCE_EXHAUSTED) or streams normally to
exactly one finish; never UNKNOWN or INTERNAL; and the server keeps serving."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.testing.model_server import generate, running_server, start, synthetic_spec
from model_server.server import ModelServer

pytestmark = pytest.mark.integration

T = TypeVar("T")

MAX_MESSAGE = 64 * 1024
MODELS = [synthetic_spec("synthetic", ttft_ms=0, itl_ms=0, max_context=256, max_tokens=64)]
GENERATE = "/llmstream.v1.ModelService/Generate"
TOKENIZE = "/llmstream.v1.ModelService/Tokenize"
LIST_MODELS = "/llmstream.v1.ModelService/ListModels"
FIELD = re.compile(r"^(start|model|prompt)(\.[\w.\[\]]+)?: \S")
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
GARBAGE = [b"\xff\xff\xff", b"\x0a\x05garbage", b"\x12" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x80"]


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[tuple[ModelServer, grpc.aio.Channel]]:
    async with running_server(MODELS, max_message_bytes=MAX_MESSAGE) as (srv, channel):
        yield srv, channel


@pytest.fixture
def stub(server: tuple[ModelServer, grpc.aio.Channel]) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(server[1])


async def still_serves(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    ok = await generate(stub, start("synthetic", text="still there?", max_tokens=5))
    assert ok.code == grpc.StatusCode.OK and ok.finish.usage.completion_tokens == 5


@pytest.mark.parametrize("raw", GARBAGE)
async def test_bytes_that_are_not_protobuf_are_invalid_argument(
    server: tuple[ModelServer, grpc.aio.Channel],
    stub: model_service_pb2_grpc.ModelServiceStub,
    raw: bytes,
) -> None:
    channel = server[1]
    call = channel.stream_stream(GENERATE)(iter([raw]), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == "not a valid llmstream.v1.GenerateRequest message"
    for method, name in ((TOKENIZE, "TokenizeRequest"), (LIST_MODELS, "ListModelsRequest")):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await channel.unary_unary(method)(raw, timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details() == f"not a valid llmstream.v1.{name} message"
    await still_serves(stub)


async def test_garbage_after_the_start_leaves_the_stream_to_finish(
    server: tuple[ModelServer, grpc.aio.Channel],
) -> None:
    """A control message that does not decode is dropped; the generation still ends once."""
    first = model_service_pb2.GenerateRequest(start=start("synthetic", max_tokens=20))
    call = server[1].stream_stream(GENERATE, response_deserializer=None)(
        iter([first.SerializeToString(), b"\xff\xff\xff"]), timeout=10
    )
    responses = [model_service_pb2.GenerateResponse.FromString(r) async for r in call]
    assert await call.code() == grpc.StatusCode.OK
    finishes = [r.finish for r in responses if r.HasField("finish")]
    assert len(finishes) == 1 and responses[-1].HasField("finish")
    assert finishes[0].usage.completion_tokens == 20


async def test_oversized_messages_are_resource_exhausted(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    big = "z" * (MAX_MESSAGE + 1)
    res = await generate(stub, start("synthetic", text=big))
    assert res.code == grpc.StatusCode.RESOURCE_EXHAUSTED and res.deltas == []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Tokenize(
            model_service_pb2.TokenizeRequest(model="synthetic", prompt=common_pb2.Prompt(text=big))
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await still_serves(stub)


async def test_prompt_longer_than_the_context_is_invalid_argument(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    res = await generate(stub, start("synthetic", text="y" * 300, max_tokens=5))  # context 256
    assert res.code == grpc.StatusCode.INVALID_ARGUMENT
    assert res.details.startswith("start.prompt:") and "context" in res.details


# ---- fuzzed GenerateStart -----------------------------------------------------------------

uint32 = st.integers(0, 2**32 - 1)
float32 = st.floats(width=32)  # NaN, infinities, negatives, huge
texts = st.text(max_size=60) | st.integers(200, 2_000).map(lambda n: "t" * n)
prompts = st.one_of(
    st.none(),
    texts.map(lambda t: common_pb2.Prompt(text=t)),
    st.lists(
        st.tuples(st.sampled_from(["system", "user", "assistant", "tool", ""]), texts),
        max_size=4,
    ).map(
        lambda ms: common_pb2.Prompt(
            chat=common_pb2.ChatPrompt(
                messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in ms]
            )
        )
    ),
    st.lists(uint32 | st.integers(0, 300), max_size=300).map(
        lambda ids: common_pb2.Prompt(tokens=common_pb2.PromptTokens(ids=ids))
    ),
)


def mostly(valid: st.SearchStrategy[T], invalid: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Valid 4 times in 5: a call must get past the first checks to reach the later ones."""
    return st.integers(0, 4).flatmap(lambda i: invalid if i == 4 else valid)


@st.composite
def sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams(
        top_k=draw(mostly(st.integers(0, 50), uint32)),
        stop=draw(
            mostly(
                st.lists(st.text(min_size=1, max_size=8), max_size=3),
                st.lists(st.text(max_size=80), max_size=12),
            )
        ),
        logprobs=draw(mostly(st.integers(0, 5), st.integers(6, 8) | uint32)),
    )
    for name, strategy in (
        ("temperature", mostly(st.floats(0, 2, width=32), float32)),
        ("top_p", mostly(st.floats(0, 1, width=32, exclude_min=True), float32)),
        ("seed", st.integers(0, 2**64 - 1)),
    ):
        value = draw(st.none() | strategy)
        if value is not None:
            setattr(sp, name, value)
    return sp


@st.composite
def starts(draw: st.DrawFn) -> model_service_pb2.GenerateStart:
    msg = model_service_pb2.GenerateStart(
        request_id=draw(mostly(st.text(min_size=1, max_size=40), st.text(max_size=300))),
        model=draw(
            mostly(st.just("synthetic"), st.sampled_from(["", "nope"]) | st.text(max_size=20))
        ),
        sampling=draw(sampling()),
        max_tokens=draw(mostly(st.integers(0, 80), uint32)),
        priority=draw(st.integers(-(2**31), 2**31 - 1)),
        continuation_token_ids=draw(
            mostly(st.lists(st.integers(0, 200), max_size=5), st.lists(uint32, max_size=5))
        ),
    )
    prompt = draw(mostly(prompts.filter(lambda p: p is not None), st.none()))
    if prompt is not None:
        msg.prompt.CopyFrom(prompt)
    return msg


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(msg=starts())
async def test_fuzzed_starts_end_with_a_clear_status(
    stub: model_service_pb2_grpc.ModelServiceStub, msg: model_service_pb2.GenerateStart
) -> None:
    res = await generate(stub, msg, deadline_s=10)
    assert res.code in CLEAR, (res.code, res.details, msg)
    if res.code == grpc.StatusCode.OK:
        assert len(res.finishes) == 1
        assert [d.seq for d in res.deltas] == list(range(1, len(res.deltas) + 1))
        assert res.finish.last_seq == len(res.deltas)
    elif res.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert FIELD.match(res.details), res.details  # names the offending field
        assert res.deltas == [] and res.finishes == []
    elif res.code == grpc.StatusCode.NOT_FOUND:
        assert msg.model not in ("synthetic", "")
    assert "Traceback" not in res.details
    models = await stub.ListModels(model_service_pb2.ListModelsRequest(), timeout=5)
    assert [m.name for m in models.models] == ["synthetic"]
