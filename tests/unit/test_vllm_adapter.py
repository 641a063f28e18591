"""The vLLM adapter's pure parts, without vLLM: token bytes of Hugging Face vocabularies,
engine and sampling arguments, logprobs, and the engine against a small stand-in of the
``AsyncLLM`` methods it calls (abort endings of both kinds, engine-core timestamps, the
scheduler counts, priority). The real engine is tested in
tests/integration/test_model_server_vllm.py and test_vllm_pipeline.py."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from model_server.engines import hf_vocab
from model_server.engines.vllm import (
    VllmApi,
    VllmEngine,
    _logprobs,
    engine_args,
    model_version,
    sampling_kwargs,
)
from model_server.errors import EngineError
from model_server.generation import Delta, Finished, Generation
from model_server.types import EngineRequest, Finish, ModelLimits, Sampling
from model_server.vllm_env import STAMP


# -- token bytes ------------------------------------------------------------------------------
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's published mapping (openai/gpt-2 encoder.py), as the reference."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def test_byte_level_tokens_map_back_to_their_bytes() -> None:
    to_unicode = gpt2_bytes_to_unicode()
    data = "Ġcafé 🦜\n\t".encode() + bytes(range(256))
    tokens = ["".join(to_unicode[b] for b in data[i : i + 3]) for i in range(0, len(data), 3)]
    got = hf_vocab.vocab_bytes(tokens, "byte_level", {})
    assert b"".join(got) == data


def test_sentencepiece_spaces_and_byte_fallback() -> None:
    got = hf_vocab.vocab_bytes(["▁Hello", "<0x0A>", "<0xF0>", "▁wörld"], "sentencepiece", {})
    assert got == [b" Hello", b"\n", b"\xf0", " wörld".encode()]


def test_added_tokens_special_are_empty_others_are_their_text() -> None:
    got = hf_vocab.vocab_bytes(
        ["a", None], "byte_level", {1: ("<|im_end|>", True), 3: ("é!", False)}
    )
    assert got == [b"a", b"", b"", "é!".encode()]


@pytest.mark.parametrize(
    ("decoder", "kind"),
    [
        ({"type": "ByteLevel"}, "byte_level"),
        ({"type": "Metaspace", "replacement": "▁"}, "sentencepiece"),
        (
            {
                "type": "Sequence",
                "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ],
            },
            "sentencepiece",
        ),
    ],
)
def test_decoder_kinds(decoder: dict[str, Any], kind: str) -> None:
    assert hf_vocab.decoder_kind(decoder) == kind


def test_unknown_decoder_is_refused_by_name() -> None:
    with pytest.raises(EngineError, match="WordPiece"):
        hf_vocab.decoder_kind({"type": "WordPiece"})


class Backend:
    """The two methods of `tokenizers.Tokenizer` the module reads."""

    def __init__(self, vocab: list[str], spec: dict[str, Any]) -> None:
        self.vocab, self.spec = vocab, spec

    def to_str(self) -> str:
        return json.dumps(self.spec)

    def get_vocab_size(self, with_added_tokens: bool) -> int:
        return len(self.vocab)

    def id_to_token(self, i: int) -> str | None:
        return self.vocab[i] if i < len(self.vocab) else None


def test_tokenizer_vocab_is_padded_to_the_model_vocabulary() -> None:
    spec = {
        "decoder": {"type": "ByteLevel"},
        "added_tokens": [{"id": 0, "content": "<s>", "special": True}],
    }
    tok = type("Tok", (), {"backend_tokenizer": Backend(["<s>", "Ġa"], spec)})()
    assert hf_vocab.tokenizer_vocab_bytes(tok, size=4) == [b"", b" a", b"", b""]
    with pytest.raises(EngineError, match="not a fast"):
        hf_vocab.tokenizer_vocab_bytes(object(), size=4)


# -- arguments --------------------------------------------------------------------------------
LIMITS = ModelLimits(max_concurrency=4, max_context=1024)


def test_cpu_defaults_and_gpu_settings() -> None:
    opts = {"model": "m", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8}
    cpu = engine_args(opts, LIMITS, on_cpu=True)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] is True
    assert cpu["kv_cache_memory_bytes"] == 512 << 20
    assert "gpu_memory_utilization" not in cpu
    assert cpu["max_num_seqs"] == 4 and cpu["max_model_len"] == 1024
    assert cpu["scheduling_policy"] == "priority" and cpu["disable_log_stats"] is True
    gpu = engine_args({**opts, "engine_args": {"enable_prefix_caching": False}}, LIMITS, False)
    assert gpu["tensor_parallel_size"] == 2 and gpu["gpu_memory_utilization"] == 0.8
    assert "dtype" not in gpu and "kv_cache_memory_bytes" not in gpu
    assert gpu["enable_prefix_caching"] is False
    assert engine_args({"model": "m", "dtype": "bfloat16"}, LIMITS, True)["dtype"] == "bfloat16"


def test_sampling_kwargs_leave_text_to_the_core() -> None:
    req = EngineRequest("r", [1], 9, Sampling(temperature=0.7, top_p=0.9, stop=("x",)))
    kw = sampling_kwargs(req)
    assert kw == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 9, "detokenize": False}
    req.sampling = Sampling(temperature=1.0, top_k=5, seed=3, logprobs=2)
    kw = sampling_kwargs(req)
    assert (kw["top_k"], kw["seed"], kw["logprobs"]) == (5, 3, 2)


def test_model_version_of_converted_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"w")
    stamp = {"files": {"model.safetensors": {"bytes": 1, "sha256": "ab" * 32}}}
    (tmp_path / STAMP).write_text(json.dumps(stamp))
    assert model_version({"model": str(tmp_path)}) == "sha256:" + "ab" * 6
    assert model_version({"model": "org/name", "revision": "v2"}) == "v2"
    assert model_version({"model": "org/name"}) == "org/name"


@dataclass
class Logprob:
    logprob: float
    rank: int | None


def test_logprobs_top_k_by_rank_and_the_sampled_token() -> None:
    entry = {7: Logprob(-3.0, 9), 1: Logprob(-0.1, 1), 2: Logprob(-2.5, 2)}
    completion = type("C", (), {"logprobs": [entry]})()
    (got,) = _logprobs(completion, [7], Sampling(logprobs=2)) or []
    assert got.token_id == 7 and got.logprob == -3.0
    assert got.top == ((1, -0.1), (2, -2.5))
    assert _logprobs(completion, [7], Sampling()) is None


# -- the engine over a stand-in AsyncLLM --------------------------------------------------------
class OutputKind(enum.Enum):
    DELTA = 1


@dataclass
class Stats:
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool
    metrics: Stats


@dataclass
class StandIn:
    """The AsyncLLM methods the engine calls. `script` is what generate yields; an abort
    ends the stream with an `abort` output, or silently with `silent_abort`."""

    script: list[list[int]] = field(default_factory=list)
    silent_abort: bool = False
    calls: list[tuple[str, Any]] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    stat_logger: Any = None

    model_config: Any = None

    def __post_init__(self) -> None:
        self.model_config = type(
            "MC",
            (),
            {
                "get_vocab_size": lambda _s: 8,
                "try_get_generation_config": lambda _s: {"eos_token_id": [3, 4]},
            },
        )()

    async def get_tokenizer(self) -> Any:
        spec = {
            "decoder": {"type": "ByteLevel"},
            "added_tokens": [{"id": 4, "content": "</s>", "special": True}],
        }
        backend = Backend(["a", "b", "c", "d", "</s>"], spec)
        return type(
            "Tok",
            (),
            {"backend_tokenizer": backend, "eos_token_id": 3, "encode": lambda _s, t: [0]},
        )()

    async def generate(
        self, prompt: dict[str, Any], params: dict[str, Any], rid: str, priority: int = 0
    ) -> AsyncGenerator[Output, None]:
        self.calls.append(("generate", (prompt["prompt_token_ids"], params, priority)))
        now = asyncio.get_running_loop().time()
        stats = Stats(scheduled_ts=now, first_token_ts=now, last_token_ts=now)
        self.stat_logger.record(
            type("S", (), {"num_running_reqs": 1, "num_waiting_reqs": 2})(), None
        )
        for i, ids in enumerate(self.script):
            if self.aborted.is_set():
                break
            last = i == len(self.script) - 1
            yield Output([Completion(ids, "length" if last else None)], last, stats)
            await asyncio.sleep(0)
        else:
            return
        if not self.silent_abort:
            yield Output([Completion([], "abort")], True, stats)

    async def abort(self, rid: str) -> None:
        self.calls.append(("abort", rid))
        self.aborted.set()

    async def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))


def engine_with(standin: StandIn) -> VllmEngine:
    class AsyncLLM:
        @staticmethod
        def from_engine_args(args: dict[str, Any], stat_loggers: list[Any]) -> StandIn:
            standin.calls.append(("args", args))
            standin.stat_logger = stat_loggers[0](None, 0)
            return standin

    class StatLoggerBase:
        pass

    api = VllmApi(
        AsyncLLM,
        lambda **kw: kw,
        lambda **kw: kw,
        lambda ids: {"type": "token", "prompt_token_ids": ids},
        OutputKind,
        StatLoggerBase,
        on_cpu=True,
    )
    return VllmEngine({"model": "m"}, LIMITS, api=api)


async def run(
    engine: VllmEngine, req: EngineRequest, cancel_after: int | None = None
) -> list[Delta | Finished]:
    gen = Generation(engine, req, model_name="m")
    out: list[Delta | Finished] = []
    async with contextlib.aclosing(gen.run()) as events:
        async for ev in events:
            out.append(ev)
            if cancel_after is not None and len(out) == cancel_after:
                gen.cancel("client")
    return out


async def test_load_prompt_priority_times_and_counts() -> None:
    standin = StandIn(script=[[0], [1, 2], [4]])
    engine = engine_with(standin)
    await engine.load()
    assert engine.info.eos_token_ids == {3, 4} and engine.info.vocab_size == 8
    req = EngineRequest("r1", [0, 1], 5, Sampling(temperature=0.0), [2], priority=7, arrival=1.0)
    events = await run(engine, req)
    prompt, params, priority = [c for c in standin.calls if c[0] == "generate"][-1][1]
    assert prompt == [0, 1, 2] and priority == -7
    assert params["output_kind"] is OutputKind.DELTA and params["detokenize"] is False
    deltas = [e for e in events if isinstance(e, Delta)]
    assert [d.token_ids for d in deltas] == [[0], [1, 2], [4]]  # a multi-token delta
    assert "".join(d.text for d in deltas) == "abc"  # id 4 is an end-of-sequence id: no text
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason is Finish.LENGTH
    assert fin.completion_tokens == 5  # continuation + new
    assert req.scheduled_at is not None and req.scheduled_at > 1.0
    assert (engine.running, engine.waiting) == (1, 2)  # from vLLM's scheduler stats
    await engine.close()
    assert ("shutdown", None) in standin.calls


@pytest.mark.parametrize("silent", [False, True])
async def test_abort_ends_with_cancelled_with_or_without_a_final_output(silent: bool) -> None:
    standin = StandIn(script=[[0]] * 50, silent_abort=silent)
    engine = engine_with(standin)
    await engine.load()
    standin.aborted.clear()
    events = await run(engine, EngineRequest("r2", [0], 50, Sampling(temperature=0.0)), 3)
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason is Finish.CANCELLED and fin.message == "client"
    assert ("abort", "r2") in standin.calls
    assert engine.active_requests() == frozenset()


async def test_stop_prefix_held_back_is_sent_when_the_stream_ends_otherwise() -> None:
    """A stream ending (LENGTH) while text is held back as a possible stop-string start sends
    that text: it was generated text after all (vLLM does the same). It leaves with the step's
    last tokens, not as a message of its own (natural batching, issue 21)."""
    standin = StandIn(script=[[0], [1]])
    engine = engine_with(standin)
    await engine.load()
    events = await run(engine, EngineRequest("r3", [0], 2, Sampling(temperature=0.0, stop=("bz",))))
    deltas = [e for e in events if isinstance(e, Delta)]
    assert "".join(d.text for d in deltas) == "ab"
    assert deltas[-1].token_ids == [1] and deltas[-1].text == "b"
    assert [d.seq for d in deltas] == [1, 2]
