"""OpenAI wire types: request bodies -> one neutral `GenerationRequest`, and what a stream
needs besides its events (`StreamContext`).

Pure: no I/O. `parse_chat`, `parse_completion` and `parse_response` check a JSON body of their
endpoint (types, bounds, and the features llmstream does not serve, each refused with a 400
`OpenAIError` that names its `param`: gateway/openai/errors.py); unknown fields are ignored, as
OpenAI does. The platform's bounds (prompt size, messages, stop strings) are the WebSocket
protocol's, so both front ends admit the same requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gateway.admission import ChatMessage, SubmitRequest
from gateway.openai.errors import invalid_json, invalid_type, invalid_value, missing, unsupported
from gateway.protocol import MAX_ID_CHARS, MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_STOP, MAX_STOP_CHARS
from llmstream.fold import RequestState

Api = Literal["chat", "completions", "responses"]

MAX_TOKENS_BOUND = 1_000_000  # the WebSocket's bound of max_tokens
MAX_SEED = 2**63 - 1
# Stream positions (gateway/openai/sse.py): token seqs are uint32, a few terminal events follow.
MAX_POSITION = 2**32 + 16
# OpenAI's documented default of the legacy completions endpoint: a client that leaves
# max_tokens out gets what it would get from OpenAI.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# -- the neutral request ------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest(SubmitRequest):
    """One generation as any OpenAI endpoint asked for it: the admission's protocol-neutral
    `SubmitRequest` (exactly one of prompt or messages; `max_tokens` None: the model's limit
    decides) plus how this endpoint answers it."""

    api: Api = "chat"
    max_tokens_param: str = "max_tokens"  # as the client named it: max_completion_tokens, ...
    stream: bool = False
    include_usage: bool = False  # chat/completions: stream_options.include_usage
    # OpenAI answers a max_tokens above the model's limit with a 400 naming the parameter.
    refuse_over_model_limit: bool = True

    def param(self, field: str) -> str:
        """A field of the neutral request (as the gateway names it in a refusal) -> the
        request parameter the client sent."""
        if field == "max_tokens":
            return self.max_tokens_param
        if self.api == "responses" and field.startswith(("messages", "prompt")):
            return "input"
        return field


def parse_json(body: bytes) -> Mapping[str, Any]:
    """A request body -> its JSON object."""
    try:
        obj = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise invalid_json() from None
    if not isinstance(obj, dict):
        raise invalid_json()
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_chat(body: Mapping[str, Any]) -> GenerationRequest:
    """A `POST /v1/chat/completions` body."""
    _one_choice(body)
    for name in ("tools", "functions"):
        if body.get(name):
            raise unsupported(name, "Function calling (`tools`, `functions`) is not supported.")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise unsupported("tool_choice", "Function calling (`tool_choice`) is not supported.")
    _no_logprobs(body, "logprobs", "top_logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise unsupported("response_format", "Only the `text` response format is supported.")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise unsupported("audio", "Audio output is not supported.")
    if body.get("messages") is None:
        raise missing("messages")
    stream = _bool(body, "stream")
    max_tokens, param = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    return GenerationRequest(
        api="chat",
        model=_model(body),
        messages=tuple(_messages(body["messages"], "messages", ("text",))),
        max_tokens=max_tokens,
        max_tokens_param=param,
        temperature=_temperature(body),
        top_p=_top_p(body),
        seed=_seed(body),
        stop=_stop(body),
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def parse_completion(body: Mapping[str, Any]) -> GenerationRequest:
    """A `POST /v1/completions` body."""
    _one_choice(body)
    if body.get("echo"):
        raise unsupported("echo", "`echo` is not supported.")
    if body.get("suffix") is not None:
        raise unsupported("suffix", "`suffix` (insertion) is not supported.")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise unsupported("best_of", "Only best_of=1 is supported.")
    _no_logprobs(body, "logprobs")
    stream = _bool(body, "stream")
    max_tokens, param = _max_tokens(body, ("max_tokens",))
    return GenerationRequest(
        api="completions",
        model=_model(body),
        prompt=_prompt(body.get("prompt")),
        max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        max_tokens_param=param,
        temperature=_temperature(body),
        top_p=_top_p(body),
        seed=_seed(body),
        stop=_stop(body),
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def parse_response(body: Mapping[str, Any]) -> GenerationRequest:
    """A `POST /v1/responses` body (the subset of docs/openai.md)."""
    for name, what in (
        ("previous_response_id", "Conversation state (`previous_response_id`)"),
        ("conversation", "Conversation state (`conversation`)"),
        ("prompt", "Prompt templates (`prompt`)"),
    ):
        if body.get(name) is not None:
            raise unsupported(name, f"{what} is not supported; send the whole input.")
    if body.get("tools"):
        raise unsupported("tools", "Tools (function calling, search, ...) are not supported.")
    if body.get("top_logprobs"):
        raise unsupported("top_logprobs", "Log probabilities are not supported.")
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise unsupported("text.format", "Only the `text` output format is supported.")
    background = _bool(body, "background")
    if background and body.get("store") is False:
        raise invalid_value("store", "Background responses must be stored (`store` true).")
    if body.get("input") is None:
        raise missing("input")
    messages: list[ChatMessage] = []
    instructions = body.get("instructions")
    if instructions is not None:
        messages.append(ChatMessage("system", _text(instructions, "instructions")))
    raw = body["input"]
    if isinstance(raw, str):
        messages.append(ChatMessage("user", _text(raw, "input")))
    else:
        messages += _messages(raw, "input", ("input_text", "output_text"), items=True)
    _check_prompt_size(messages, "input")
    max_tokens, param = _max_tokens(body, ("max_output_tokens",))
    return GenerationRequest(
        api="responses",
        model=_model(body),
        messages=tuple(messages),
        max_tokens=max_tokens,
        max_tokens_param=param,
        temperature=_temperature(body),
        top_p=_top_p(body),
        stream=_bool(body, "stream"),
        background=background,
    )


def idempotency_key(header: str | None) -> str | None:
    """The `Idempotency-Key` header: the same key from the same tenant within 24 h returns the
    request that holds it instead of starting a new one."""
    if header is None:
        return None
    if not header or len(header) > MAX_ID_CHARS:
        raise invalid_value("Idempotency-Key", f"must be 1 to {MAX_ID_CHARS} characters")
    return header


def starting_after(raw: str | None) -> int:
    """`?starting_after=N` of a Responses stream: events after sequence number N (-1: all)."""
    if raw is None:
        return -1
    if not raw.isdigit() or int(raw) > MAX_POSITION:
        raise invalid_value("starting_after", "must be a sequence number (an integer >= 0)")
    return int(raw)


def query_flag(raw: str | None, name: str) -> bool:
    """A boolean query parameter (`?stream=true`)."""
    if raw is None or raw in ("false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise invalid_value(name, "must be true or false")


# -- field checks -------------------------------------------------------------------------------


def _model(body: Mapping[str, Any]) -> str:
    value = body.get("model")
    if value is None:
        raise missing("model")
    if not isinstance(value, str) or not value:
        raise invalid_type("model", "a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise invalid_value("model", f"is longer than {MAX_ID_CHARS} characters")
    return _unicode(value, "model")


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string")
    return _unicode(value, param)


def _unicode(value: str, param: str) -> str:
    """JSON can carry a lone surrogate (`"\\ud800"`) that no UTF-8 encoder accepts: it could not
    be written into a protobuf event."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_value(param, "is not valid Unicode (lone surrogate)") from None
    return value


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_type(name, "a boolean")
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid_type(name, "a number")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(name, "an integer")
    if not lo <= value <= hi:
        raise invalid_value(name, f"must be between {lo} and {hi}")
    return value


def _temperature(body: Mapping[str, Any]) -> float | None:
    value = _number(body, "temperature")
    if value is not None and not 0.0 <= value <= 2.0:
        raise invalid_value("temperature", "must be between 0 and 2")
    return value


def _top_p(body: Mapping[str, Any]) -> float | None:
    value = _number(body, "top_p")
    if value is not None and not 0.0 < value <= 1.0:
        raise invalid_value("top_p", "must be greater than 0 and at most 1")
    return value


def _seed(body: Mapping[str, Any]) -> int | None:
    return _integer(body, "seed", 0, MAX_SEED)


def _max_tokens(body: Mapping[str, Any], names: tuple[str, ...]) -> tuple[int | None, str]:
    """The first of `names` that is set (newer spelling first), and which one it was."""
    for name in names:
        value = _integer(body, name, 1, MAX_TOKENS_BOUND)
        if value is not None:
            return value, name
    return None, names[0]


def _one_choice(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise invalid_type("n", "an integer")
    if n != 1:
        raise unsupported("n", "Only n=1 is supported: send one request per choice.")


def _no_logprobs(body: Mapping[str, Any], *names: str) -> None:
    for name in names:
        value = body.get(name)
        if value is not None and value is not False:
            raise unsupported(name, "Log probabilities are not supported.")


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid_value(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is true.",
        )
    if not isinstance(options, dict):
        raise invalid_type("stream_options", "an object")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise invalid_type("stream_options.include_usage", "a boolean")
    return bool(value)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    raw = body.get("stop")
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise invalid_value("stop", f"must be a string or an array of at most {MAX_STOP} strings")
    for item in items:
        if not isinstance(item, str) or not item or len(item) > MAX_STOP_CHARS:
            raise invalid_value(
                "stop", f"items must be non-empty strings of at most {MAX_STOP_CHARS} characters"
            )
        _unicode(item, "stop")
    return tuple(items)


def _prompt(raw: Any) -> str:
    if raw is None:
        raise missing("prompt")
    if isinstance(raw, list):
        if any(not isinstance(p, str) for p in raw):
            raise unsupported("prompt", "Token-id prompts are not supported: send text.")
        if len(raw) != 1:
            raise unsupported("prompt", "Batched prompts are not supported: one prompt each.")
        raw = raw[0]
    prompt = _text(raw, "prompt")
    if not prompt:
        raise invalid_value("prompt", "must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid_value("prompt", f"is longer than {MAX_PROMPT_CHARS} characters")
    return prompt


def _messages(
    raw: Any, param: str, text_parts: tuple[str, ...], *, items: bool = False
) -> list[ChatMessage]:
    """Chat messages (`messages`, or the Responses `input` items when `items`): text content
    only, `developer` read as `system` (OpenAI's newer name for it)."""
    if not isinstance(raw, list) or not raw:
        raise invalid_value(param, "must be a non-empty array")
    if len(raw) > MAX_MESSAGES:
        raise invalid_value(param, f"has more than {MAX_MESSAGES} items")
    out = []
    for i, m in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise invalid_type(where, "an object")
        kind = m.get("type", "message") if items else "message"
        if kind != "message":
            raise unsupported(f"{where}.type", f"Input items of type {kind!r} are not supported.")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise unsupported(f"{where}.role", "Function calling (tool messages) is not supported.")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise invalid_value(
                f"{where}.role", "must be one of system, developer, user, assistant"
            )
        out.append(ChatMessage(role, _content(m.get("content"), f"{where}.content", text_parts)))
    _check_prompt_size(out, param)
    return out


def _content(raw: Any, param: str, text_parts: tuple[str, ...]) -> str:
    """A message's content: a string, or text parts joined by newlines (as vLLM does)."""
    if isinstance(raw, str):
        return _unicode(raw, param)
    if not isinstance(raw, list):
        raise invalid_type(param, "a string or an array of content parts")
    texts = []
    for j, part in enumerate(raw):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in text_parts:
            raise unsupported(
                f"{where}.type", "Only text content is supported (no images, audio or files)."
            )
        texts.append(_text(part.get("text"), f"{where}.text"))
    return "\n".join(texts)


def _check_prompt_size(messages: list[ChatMessage], param: str) -> None:
    if sum(len(m.content) for m in messages) > MAX_PROMPT_CHARS:
        raise invalid_value(param, f"is longer than {MAX_PROMPT_CHARS} characters in total")


# -- what a stream needs besides its events -----------------------------------------------------


@dataclass(frozen=True)
class StreamContext:
    """What rendering a request's OpenAI objects needs besides its events, identical on every
    replica: recorded with the request at submit (`dumps`), read back on resume (`loads`)."""

    api: Api
    request_id: str
    model: str
    created: int  # Unix seconds of the submit
    max_tokens: int  # effective (after caps): a Response echoes it as max_output_tokens
    include_usage: bool = False
    background: bool = False
    temperature: float | None = None
    top_p: float | None = None

    @classmethod
    def of(
        cls, req: GenerationRequest, request_id: str, submitted_ms: int, max_tokens: int
    ) -> StreamContext:
        return cls(
            api=req.api,
            request_id=request_id,
            model=req.model,
            created=submitted_ms // 1000,
            max_tokens=max_tokens,
            include_usage=req.include_usage,
            background=req.background,
            temperature=req.temperature,
            top_p=req.top_p,
        )

    def dumps(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str) -> StreamContext:
        """ValueError when `raw` is not a recorded context."""
        try:
            obj = json.loads(raw)
            ctx = cls(**obj)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a stream context: {exc}") from None
        if ctx.api not in ("chat", "completions", "responses"):
            raise ValueError(f"not a stream context: api {ctx.api!r}")
        return ctx


def dumps(obj: Any) -> str:
    """Compact JSON with non-ASCII text as is (what OpenAI sends)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def usage(state: RequestState) -> dict[str, int]:
    """Chat and completions usage (the terminal event's: every billed token)."""
    return {
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "total_tokens": state.prompt_tokens + state.completion_tokens,
    }
