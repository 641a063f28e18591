"""GenerateStart / Tokenize requests -> validated engine inputs.

Every problem raises ``InvalidArgument`` whose message starts with the field path
(``start.sampling.temperature: ...``), mapped to gRPC INVALID_ARGUMENT.

Context length policy (docs/model_server.md): a prompt (plus continuation) that leaves no
room for a single new token is INVALID_ARGUMENT on ``start.prompt``; otherwise the
generation is capped by the context and, when the cap is what ends it, finishes with
FINISH_REASON_LENGTH and the message says so. A continuation that already reached
``max_tokens`` or the context ends at once with LENGTH, as the uninterrupted run did.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

from llmstream.v1 import common_pb2, model_service_pb2
from model_server.errors import InvalidArgument
from model_server.registry import ModelHandle
from model_server.types import ChatTurn, EngineRequest, ModelLimits, PromptInput, Sampling

MAX_REQUEST_ID_CHARS = 256
MAX_LOGPROBS = 5
CHAT_ROLES = frozenset({"system", "user", "assistant"})

_engine_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ParsedStart:
    request_id: str
    model: str
    prompt: PromptInput
    sampling: Sampling
    max_tokens: int  # 0 = model default
    priority: int
    continuation: tuple[int, ...]


def parse_prompt(prompt: common_pb2.Prompt, field: str, limits: ModelLimits) -> PromptInput:
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(field, "set one of text, chat or tokens")
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument(f"{field}.text", "must not be empty")
        if len(prompt.text.encode()) > limits.max_prompt_bytes:
            raise InvalidArgument(f"{field}.text", f"longer than {limits.max_prompt_bytes} bytes")
        return PromptInput(text=prompt.text)
    if kind == "chat":
        messages = prompt.chat.messages
        if not messages:
            raise InvalidArgument(f"{field}.chat.messages", "must not be empty")
        size = 0
        turns = []
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"{field}.chat.messages[{i}].role",
                    f"must be one of {', '.join(sorted(CHAT_ROLES))}, got {m.role!r}",
                )
            size += len(m.content.encode())
            turns.append(ChatTurn(m.role, m.content))
        if size > limits.max_prompt_bytes:
            raise InvalidArgument(
                f"{field}.chat.messages", f"longer than {limits.max_prompt_bytes} bytes"
            )
        return PromptInput(chat=tuple(turns))
    ids = prompt.tokens.ids
    if not ids:
        raise InvalidArgument(f"{field}.tokens.ids", "must not be empty")
    return PromptInput(token_ids=tuple(ids))


def parse_sampling(sp: common_pb2.SamplingParams, limits: ModelLimits) -> Sampling:
    f = "start.sampling"
    temperature = sp.temperature if sp.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
        raise InvalidArgument(f"{f}.temperature", f"must be in [0, 2], got {temperature:g}")
    top_p = sp.top_p if sp.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"{f}.top_p", f"must be in (0, 1], got {top_p:g}")
    if sp.logprobs > MAX_LOGPROBS:
        raise InvalidArgument(f"{f}.logprobs", f"must be <= {MAX_LOGPROBS}, got {sp.logprobs}")
    if len(sp.stop) > limits.max_stop_strings:
        raise InvalidArgument(f"{f}.stop", f"at most {limits.max_stop_strings} stop strings")
    for i, s in enumerate(sp.stop):
        if not s:
            raise InvalidArgument(f"{f}.stop[{i}]", "must not be empty")
        if len(s.encode()) > limits.max_stop_bytes:
            raise InvalidArgument(f"{f}.stop[{i}]", f"longer than {limits.max_stop_bytes} bytes")
    return Sampling(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(sp.top_k),
        seed=int(sp.seed) if sp.HasField("seed") else None,
        stop=tuple(sp.stop),
        logprobs=int(sp.logprobs),
    )


def parse_start(start: model_service_pb2.GenerateStart, limits: ModelLimits) -> ParsedStart:
    """Checks that need the model's limits but not its tokenizer."""
    if not start.request_id:
        raise InvalidArgument("start.request_id", "must not be empty")
    if len(start.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("start.request_id", f"longer than {MAX_REQUEST_ID_CHARS} chars")
    if not start.HasField("prompt"):
        raise InvalidArgument("start.prompt", "is required")
    prompt = parse_prompt(start.prompt, "start.prompt", limits)
    sampling = parse_sampling(start.sampling, limits)
    if start.max_tokens > limits.max_tokens:
        raise InvalidArgument(
            "start.max_tokens",
            f"must be <= {limits.max_tokens} for this model, got {start.max_tokens}",
        )
    return ParsedStart(
        request_id=start.request_id,
        model=start.model,
        prompt=prompt,
        sampling=sampling,
        max_tokens=int(start.max_tokens),
        priority=int(start.priority),
        continuation=tuple(start.continuation_token_ids),
    )


def check_token_ids(ids: tuple[int, ...] | list[int], vocab_size: int, field: str) -> None:
    for i, t in enumerate(ids):
        if t >= vocab_size:
            raise InvalidArgument(
                f"{field}[{i}]", f"token id {t} is outside the vocabulary (size {vocab_size})"
            )


async def tokenize_prompt(handle: ModelHandle, prompt: PromptInput, field: str) -> list[int]:
    info = handle.engine.info
    if prompt.token_ids is not None:
        check_token_ids(prompt.token_ids, info.vocab_size, f"{field}.tokens.ids")
        return list(prompt.token_ids)
    return await handle.engine.tokenize(prompt)


@dataclass(frozen=True, slots=True)
class Prepared:
    request: EngineRequest
    # Message of a LENGTH finish caused by the context rather than max_tokens.
    length_message: str


async def prepare(parsed: ParsedStart, handle: ModelHandle) -> Prepared:
    """Tokenize and apply the model's limits: the request the engine will run."""
    info = handle.engine.info
    limits = handle.limits
    check_token_ids(parsed.continuation, info.vocab_size, "start.continuation_token_ids")
    prompt_ids = await tokenize_prompt(handle, parsed.prompt, "start.prompt")
    if not prompt_ids:
        raise InvalidArgument("start.prompt", "tokenizes to no tokens")
    max_context = handle.max_context
    if len(prompt_ids) >= max_context:
        raise InvalidArgument(
            "start.prompt",
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_context} "
            "tokens and at least one must be left for the completion",
        )
    max_tokens = parsed.max_tokens or limits.default_max_tokens
    room = max_context - len(prompt_ids) - len(parsed.continuation)
    budget = max_tokens - len(parsed.continuation)
    length_message = ""
    if room < budget:
        length_message = f"reached the model's context length ({max_context} tokens)"
    req = EngineRequest(
        request_id=f"{parsed.request_id}#{next(_engine_ids)}",
        prompt_token_ids=prompt_ids,
        continuation_token_ids=list(parsed.continuation),
        max_new_tokens=max(0, min(room, budget)),
        sampling=parsed.sampling,
        priority=parsed.priority,
        arrival=time.monotonic(),
    )
    return Prepared(request=req, length_message=length_message)
