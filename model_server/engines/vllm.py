"""vLLM engine: ``AsyncLLM`` (vLLM V1), the production GPU path. Imported only when selected.

Methods of ``AsyncLLM`` used, and nothing else (the tests' stand-in implements exactly these):
``from_engine_args``, ``generate``, ``abort``, ``get_tokenizer``, ``check_health``,
``shutdown``.

- Output kind DELTA: each ``RequestOutput`` carries only the new token ids and text; vLLM
  detokenizes incrementally (holding back incomplete characters) and handles stop strings,
  so steps carry ``text`` (``EngineInfo.emits_text``).
- Prompts go in as ``TokensPrompt(prompt_token_ids=prompt + continuation)``; with greedy
  decoding the continuation equals the uninterrupted run (measured, see
  ../shared/notes/environment.md). Seeded sampling is *not* resumable on vLLM: its
  per-request generator is seeded once at the start of a request.
- Priority: our ``priority`` is "higher runs earlier"; vLLM's is "lower runs earlier", so it
  is negated. The engine is created with ``scheduling_policy="priority"``.
- Abort: ``abort(request_id)``; closing the stream aborts too (vLLM does that itself, and
  we call ``abort`` in ``finally`` to be sure).
- Timings: the queue end is vLLM's ``scheduled_ts`` when the output exposes it, otherwise
  unknown and reported as 0.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from model_server.engine import Engine, EngineInfo
from model_server.errors import EngineError
from model_server.types import (
    EngineRequest,
    EngineStep,
    Finish,
    ModelLimits,
    PromptInput,
    Sampling,
    TokenLogprobs,
)

_FINISH = {"stop": Finish.STOP, "length": Finish.LENGTH, "abort": Finish.CANCELLED}


@dataclass(frozen=True)
class VllmApi:
    """The vLLM names the engine uses (a stand-in can be injected for tests)."""

    AsyncLLM: Any
    AsyncEngineArgs: Any
    SamplingParams: Any
    TokensPrompt: Any
    RequestOutputKind: Any


def import_vllm() -> VllmApi:
    try:
        from vllm import SamplingParams, TokensPrompt
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise EngineError(f"the vllm engine needs vLLM installed: {exc}") from exc
    return VllmApi(AsyncLLM, AsyncEngineArgs, SamplingParams, TokensPrompt, RequestOutputKind)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class VllmEngine(Engine):
    kind: ClassVar[str] = "vllm"

    def __init__(
        self, options: Mapping[str, Any], limits: ModelLimits, api: VllmApi | None = None
    ) -> None:
        super().__init__(options, limits)
        if not options.get("model"):
            raise EngineError("the vllm engine needs options.model (a model name or path)")
        self._api = api
        self._llm: Any = None
        self._tokenizer: Any = None
        self._active: dict[str, bool] = {}  # request id -> produced output yet
        self.tokens_produced = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        api = self._api or import_vllm()
        self._api = api
        opts = self.options
        max_len = int(opts.get("max_model_len", self.limits.max_context))
        args: dict[str, Any] = {
            "model": opts["model"],
            "max_model_len": max_len,
            "max_num_seqs": int(opts.get("max_num_seqs", self.limits.max_concurrency)),
            "scheduling_policy": "priority",
        }
        for key in ("tokenizer", "revision", "dtype", "enforce_eager", "seed"):
            if key in opts:
                args[key] = opts[key]
        args.update(opts.get("engine_args") or {})
        self._llm = api.AsyncLLM.from_engine_args(api.AsyncEngineArgs(**args))
        self._tokenizer = await _maybe_await(self._llm.get_tokenizer())
        tok = self._tokenizer
        eos = getattr(tok, "eos_token_id", None)
        vocab_size = len(tok)
        max_token_id = getattr(tok, "max_token_id", None)
        if isinstance(max_token_id, int):
            vocab_size = max(vocab_size, max_token_id + 1)
        self._info = EngineInfo(
            vocab_size=vocab_size,
            eos_token_ids=frozenset({eos}) if isinstance(eos, int) else frozenset(),
            max_context=max_len,
            version=str(opts.get("revision") or opts.get("version") or opts["model"]),
            emits_text=True,
        )
        await self._warm_up()

    async def _warm_up(self) -> None:
        ids = await self.tokenize(PromptInput(text="Hello"))
        req = EngineRequest(
            request_id=f"warmup-{id(self)}",
            prompt_token_ids=ids or [0],
            max_new_tokens=1,
            sampling=Sampling(temperature=0.0),
            arrival=time.monotonic(),
        )
        async for _ in self.generate(req):
            pass

    async def close(self) -> None:
        for rid in list(self._active):
            await self.abort(rid)
        if self._llm is not None:
            await _maybe_await(self._llm.shutdown())
            self._llm = None

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineError("vLLM engine is not running")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"vLLM engine is unhealthy: {exc}") from exc

    # -- requests --------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return sum(1 for started in self._active.values() if started)

    @property
    def waiting(self) -> int:
        return sum(1 for started in self._active.values() if not started)

    def active_requests(self) -> frozenset[str]:
        return frozenset(self._active)

    async def tokenize(self, prompt: PromptInput) -> list[int]:
        tok = self._tokenizer

        def run() -> list[int]:
            if prompt.text is not None:
                return list(tok.encode(prompt.text))
            messages = [{"role": t.role, "content": t.content} for t in prompt.chat or ()]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
                ids = ids["input_ids"]
            return list(ids)

        return await asyncio.to_thread(run)

    async def abort(self, request_id: str) -> None:
        if request_id in self._active and self._llm is not None:
            await self._llm.abort(request_id)

    def _params(self, req: EngineRequest) -> Any:
        assert self._api is not None
        s = req.sampling
        kwargs: dict[str, Any] = {
            "n": 1,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": req.max_new_tokens,
            "stop": list(s.stop),
            "output_kind": self._api.RequestOutputKind.DELTA,
        }
        if s.top_k > 0:
            kwargs["top_k"] = s.top_k
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.logprobs:
            kwargs["logprobs"] = s.logprobs
        return self._api.SamplingParams(**kwargs)

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineStep, None]:
        if self._llm is None or self._api is None:
            raise EngineError("vLLM engine is not running")
        rid = req.request_id
        prompt = self._api.TokensPrompt(
            prompt_token_ids=[*req.prompt_token_ids, *req.continuation_token_ids]
        )
        self._active[rid] = False
        finished = False
        try:
            stream = self._llm.generate(prompt, self._params(req), rid, priority=-req.priority)
            async for out in stream:
                now = time.monotonic()
                if not self._active[rid]:
                    self._active[rid] = True
                    req.scheduled_at = _scheduled_ts(out, req.arrival)
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                self.tokens_produced += len(ids)
                step = EngineStep(
                    ids, [now] * len(ids), _logprobs(completion, ids), text=completion.text or ""
                )
                reason = completion.finish_reason
                if reason is not None or out.finished:
                    finished = True
                    step.finish = _FINISH.get(str(reason), Finish.STOP)
                    step.finished_at = now
                yield step
                if finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM: {exc}") from exc
        finally:
            self._active.pop(rid, None)
            if not finished and self._llm is not None:
                await self._llm.abort(rid)


def _scheduled_ts(out: Any, arrival: float) -> float:
    stats = getattr(out, "metrics", None)
    ts = getattr(stats, "scheduled_ts", None)
    if isinstance(ts, float) and 0 < ts <= time.monotonic():
        return ts  # vLLM's engine core uses time.monotonic(), system-wide on Linux
    return arrival  # unknown: report no queue time rather than a wrong one


def _logprobs(completion: Any, ids: list[int]) -> list[TokenLogprobs] | None:
    entries = getattr(completion, "logprobs", None)
    if not entries:
        return None
    out: list[TokenLogprobs] = []
    for token_id, entry in zip(ids, entries, strict=False):
        chosen = entry.get(token_id)
        top = sorted(((t, float(lp.logprob)) for t, lp in entry.items()), key=lambda x: -x[1])
        out.append(
            TokenLogprobs(
                token_id=token_id,
                logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                top=tuple(top),
            )
        )
    return out
