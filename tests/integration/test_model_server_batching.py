"""Natural batching on Generate, against real `llmstream model-server` processes.

A model server sends whatever its engine produced while its previous write was in flight as
one `GenerateDelta` (model_server/generation.py; the synthetic engine at zero delay produces
ahead of its reader like a real engine's decode thread). These tests check the stream a client
gets: every token exactly once and in order, with fewer messages than tokens when the engine is
faster than the reader, and one message per token when the reader keeps up with a paced model.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmstream.ports import free_port
from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.testing.model_server import StreamResult, start
from llmstream_tools.testing.worker import MODEL, start_model_server, wait_model_server
from model_server.engines.synthetic import next_token, prompt_digest, token_bytes

pytestmark = pytest.mark.integration

PROMPT = "natural batching"


def greedy_ids(n: int) -> list[int]:
    """The synthetic engine's greedy completion of PROMPT (text prompts: one token per byte)."""
    digest, prev, out = prompt_digest(list(PROMPT.encode())), -1, []
    for position in range(n):
        prev = next_token(digest, 0, position, prev)
        out.append(prev)
    return out


def served(tmp: Path, itl_ms: float) -> Iterator[str]:
    port = free_port()
    proc = start_model_server(tmp, port, itl_ms=itl_ms, ttft_ms=5)
    addr = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_model_server(addr))
        yield addr
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def zero_delay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from served(tmp_path_factory.mktemp("ms0"), itl_ms=0)


@pytest.fixture(scope="module")
def paced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # 100 ms between tokens: a message carries two tokens only if the server stood still for
    # a whole gap, which a reader that keeps up never makes it do.
    yield from served(tmp_path_factory.mktemp("ms100"), itl_ms=100)


async def read_stream(addr: str, max_tokens: int, pause_s: float) -> StreamResult:
    """One greedy Generate stream; the reader sleeps `pause_s` after each message (slow)."""
    result = StreamResult()
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        call = stub.Generate(timeout=60)
        first = start(MODEL, text=PROMPT, max_tokens=max_tokens, logprobs=1)
        await call.write(model_service_pb2.GenerateRequest(start=first))
        await call.done_writing()
        async for msg in call:
            if msg.HasField("delta"):
                result.deltas.append(msg.delta)
            else:
                result.finishes.append(msg.finish)
            if pause_s:
                await asyncio.sleep(pause_s)
        result.code = await call.code()
    return result


def check_exact(res: StreamResult, tokens: int) -> None:
    """Every token once, in order; seq counts messages without gaps; logprobs per token."""
    assert res.code == grpc.StatusCode.OK
    assert res.token_ids == greedy_ids(tokens)
    # The text is the tokens' UTF-8; a character the last tokens left unfinished is held back.
    data = b"".join(token_bytes(t) for t in res.token_ids)
    assert res.text == codecs.getincrementaldecoder("utf-8")().decode(data)
    assert [d.seq for d in res.deltas] == list(range(1, len(res.deltas) + 1))
    for d in res.deltas:
        assert [lp.token_id for lp in d.logprobs] == list(d.token_ids)
    fin = res.finish
    assert fin.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert fin.last_seq == len(res.deltas)
    assert fin.usage.completion_tokens == tokens


async def test_zero_delay_with_a_slow_reader_batches_every_token_exactly_once(
    zero_delay: str,
) -> None:
    res = await read_stream(zero_delay, max_tokens=1000, pause_s=0.002)
    check_exact(res, 1000)
    assert len(res.deltas) < 1000
    assert max(len(d.token_ids) for d in res.deltas) > 1


async def test_zero_delay_concurrent_streams_each_exact(zero_delay: str) -> None:
    results = await asyncio.gather(
        *(read_stream(zero_delay, max_tokens=300, pause_s=0) for _ in range(20))
    )
    for res in results:
        check_exact(res, 300)
    messages = sum(len(r.deltas) for r in results)
    assert messages < 20 * 300  # the engine outruns the writers: messages carry several tokens


async def test_paced_reader_that_keeps_up_gets_one_message_per_token(paced: str) -> None:
    res = await read_stream(paced, max_tokens=10, pause_s=0)
    check_exact(res, 10)
    assert [len(d.token_ids) for d in res.deltas] == [1] * 10
