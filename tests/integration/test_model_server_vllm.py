"""The vLLM engine against a stand-in AsyncLLM, plus a real test where vLLM imports."""

from __future__ import annotations

import asyncio
import enum
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import pytest

from llmstream.v1 import common_pb2, model_service_pb2_grpc
from model_server.engine import Engine
from model_server.engines.vllm import VllmApi, VllmEngine
from model_server.registry import ModelSpec
from model_server.rng import mix
from llmstream_tools.testing.model_server import generate, running_server, start
from model_server.types import ModelLimits


# -- the stand-in: exactly the AsyncLLM methods the engine uses ----------------------------
class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 16
    logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


def TokensPrompt(prompt_token_ids: list[int]) -> dict[str, Any]:  # a TypedDict in vLLM
    return {"prompt_token_ids": prompt_token_ids}


@dataclass
class AsyncEngineArgs:
    model: str
    max_model_len: int
    max_num_seqs: int
    scheduling_policy: str = "fcfs"
    enforce_eager: bool = False


class FakeTokenizer:
    eos_token_id = 3

    def __len__(self) -> int:
        return 128

    def encode(self, text: str) -> list[int]:
        return [b % 128 for b in text.encode()]

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool
    ) -> list[int]:
        assert add_generation_prompt and tokenize
        return [1] + [t for m in messages for t in self.encode(f"{m['role']}:{m['content']}")]


@dataclass
class CompletionOutput:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool


class FakeAsyncLLM:
    """Stand-in for vllm.v1.engine.async_llm.AsyncLLM: deterministic 'greedy' tokens that
    depend on the whole context, like a model; DELTA outputs; abort ends with 'abort'."""

    instances: ClassVar[list[FakeAsyncLLM]] = []

    def __init__(self, args: AsyncEngineArgs) -> None:
        self.args = args
        self.aborted: set[str] = set()
        self.running: set[str] = set()
        self.produced = 0
        self.calls: list[tuple[str, Any]] = []
        self.healthy = True
        self.fail_after: int | None = None

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs) -> FakeAsyncLLM:
        inst = cls(engine_args)
        cls.instances.append(inst)
        return inst

    async def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    async def generate(
        self,
        prompt: dict[str, Any],
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        assert sampling_params.output_kind is RequestOutputKind.DELTA
        self.calls.append(("generate", (list(prompt["prompt_token_ids"]), priority)))
        context = list(prompt["prompt_token_ids"])
        self.running.add(request_id)
        try:
            for i in range(sampling_params.max_tokens):
                await asyncio.sleep(0.002)
                if request_id in self.aborted:
                    yield RequestOutput(request_id, [CompletionOutput([], "", "abort")], True)
                    return
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                token = 32 + mix(*context) % 90  # printable ASCII
                context.append(token)
                self.produced += 1
                last = i == sampling_params.max_tokens - 1
                yield RequestOutput(
                    request_id,
                    [CompletionOutput([token], chr(token), "length" if last else None)],
                    last,
                )
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.calls.append(("abort", request_id))
        self.aborted.add(request_id)

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("engine core died")

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))


API = VllmApi(FakeAsyncLLM, AsyncEngineArgs, SamplingParams, TokensPrompt, RequestOutputKind)


def factory(spec: ModelSpec) -> Engine:
    return VllmEngine(spec.options, spec.limits, api=API)


SPEC = ModelSpec(
    name="tiny-vllm",
    engine="vllm",
    limits=ModelLimits(max_concurrency=8),
    options={"model": "fake"},
)


@pytest.fixture
async def served() -> AsyncIterator[tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM]]:
    FakeAsyncLLM.instances.clear()
    async with running_server([SPEC], engine_factory=factory) as (_srv, channel):
        yield model_service_pb2_grpc.ModelServiceStub(channel), FakeAsyncLLM.instances[-1]


async def test_engine_args_and_priority(
    served: tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM],
) -> None:
    stub, llm = served
    assert llm.args.scheduling_policy == "priority"
    assert llm.args.max_num_seqs == 8
    res = await generate(stub, start("tiny-vllm", text="hi", max_tokens=5, priority=7))
    assert res.code == grpc.StatusCode.OK
    gen = [c for c in llm.calls if c[0] == "generate"][-1]
    assert gen[1] == ([ord("h"), ord("i")], -7)  # higher ours = lower vLLM value


async def test_streams_deltas_and_one_final(
    served: tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM],
) -> None:
    stub, _llm = served
    res = await generate(stub, start("tiny-vllm", text="hello", max_tokens=12))
    assert [d.seq for d in res.deltas] == list(range(1, 13))
    assert res.text == "".join(chr(t) for t in res.token_ids)
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert res.finish.usage.completion_tokens == 12


async def test_greedy_continuation_equals_uninterrupted(
    served: tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM],
) -> None:
    stub, llm = served
    full = await generate(stub, start("tiny-vllm", text="resume", max_tokens=20))
    k = 8
    tail = await generate(
        stub, start("tiny-vllm", text="resume", max_tokens=20, continuation=full.token_ids[:k])
    )
    assert tail.token_ids == full.token_ids[k:]
    prompt_sent = [c for c in llm.calls if c[0] == "generate"][-1][1][0]
    assert prompt_sent == list(b"resume") + full.token_ids[:k]  # TokensPrompt(prompt + cont)


async def test_cancel_aborts_inside_vllm(
    served: tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM],
) -> None:
    stub, llm = served
    res = await generate(stub, start("tiny-vllm", max_tokens=500), cancel_after_deltas=3)
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert any(c[0] == "abort" for c in llm.calls)
    assert llm.running == set()
    produced = llm.produced
    await asyncio.sleep(0.05)
    assert llm.produced == produced


async def test_rpc_cancel_aborts_inside_vllm(
    served: tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM],
) -> None:
    stub, llm = served
    res = await generate(stub, start("tiny-vllm", max_tokens=500), rpc_cancel_after_deltas=2)
    assert res.code == grpc.StatusCode.CANCELLED
    for _ in range(100):
        if not llm.running:
            break
        await asyncio.sleep(0.01)
    assert llm.running == set()
    assert any(c[0] == "abort" for c in llm.calls)


async def test_engine_failure_is_internal_after_a_final_message(
    served: tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM],
) -> None:
    stub, llm = served
    llm.fail_after = 4
    res = await generate(stub, start("tiny-vllm", max_tokens=20))
    llm.fail_after = None
    assert res.code == grpc.StatusCode.INTERNAL
    assert "illegal memory access" in res.details
    assert len(res.token_ids) == 4
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert (await generate(stub, start("tiny-vllm", max_tokens=3))).code == grpc.StatusCode.OK


async def test_chat_prompt_uses_the_tokenizer_template(
    served: tuple[model_service_pb2_grpc.ModelServiceStub, FakeAsyncLLM],
) -> None:
    stub, llm = served
    await generate(stub, start("tiny-vllm", chat=[("user", "yo")], max_tokens=2))
    prompt_sent = [c for c in llm.calls if c[0] == "generate"][-1][1][0]
    assert prompt_sent == [1, *list(b"user:yo")]


async def test_unhealthy_engine_makes_model_unavailable() -> None:
    FakeAsyncLLM.instances.clear()
    async with running_server([SPEC], engine_factory=factory) as (srv, channel):
        FakeAsyncLLM.instances[-1].healthy = False
        await srv.registry.check_health()
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        res = await generate(stub, start("tiny-vllm"))
        assert res.code == grpc.StatusCode.UNAVAILABLE
        assert "engine core died" in res.details
        FakeAsyncLLM.instances[-1].healthy = True
        await srv.registry.check_health()
        assert (await generate(stub, start("tiny-vllm"))).code == grpc.StatusCode.OK
    assert ("shutdown", None) in FakeAsyncLLM.instances[-1].calls


# -- the real thing, where it can be installed ----------------------------------------------
def _tiny_llama(path: str) -> None:
    """A 4.5 M-parameter random Llama with a byte-level BPE tokenizer, saved for vLLM."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # type: ignore
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # type: ignore

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)


async def test_real_vllm_engine() -> None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA/torch install
        pytest.skip(f"vllm cannot be imported here ({type(exc).__name__}: {exc})")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = os.environ.get("LLMSTREAM_VLLM_TEST_MODEL") or tmp
        if model == tmp:
            _tiny_llama(tmp)
        spec = ModelSpec(
            name="real-vllm",
            engine="vllm",
            limits=ModelLimits(max_concurrency=4, max_context=256),
            options={
                "model": model,
                "enforce_eager": True,
                "engine_args": {"kv_cache_memory_bytes": 1 << 30},
            },
        )
        async with running_server([spec]) as (_srv, channel):
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            full = await generate(stub, start("real-vllm", text="the quick", max_tokens=40))
            assert full.code == grpc.StatusCode.OK, full.details
            assert len(full.token_ids) >= 1
            if len(full.token_ids) == 40:
                tail = await generate(
                    stub,
                    start(
                        "real-vllm",
                        text="the quick",
                        max_tokens=40,
                        continuation=full.token_ids[:15],
                    ),
                )
                assert tail.token_ids == full.token_ids[15:]
            cancelled = await generate(
                stub, start("real-vllm", text="the", max_tokens=200), cancel_after_deltas=2
            )
            assert cancelled.finish.finish_reason in (
                common_pb2.FINISH_REASON_CANCELLED,
                common_pb2.FINISH_REASON_STOP,
            )
