"""OpenAI wire types: request bodies -> one neutral `GenerationRequest`; errors in OpenAI's shape.

Pure: no I/O. `parse_chat`, `parse_completion` and `parse_response` check a JSON body of their
endpoint (types, bounds, and the features llmstream does not serve, each refused with a 400 that
names its `param`); unknown fields are ignored, as OpenAI does. The platform's bounds (prompt
size, messages, stop strings) are the WebSocket protocol's, so both front ends admit the same
requests. Every refusal is an `OpenAIError`: `{"error": {"message", "type", "code", "param"}}`
with its HTTP status; `from_refusal` renders the gateway's own refusals (admission, quota,
auth) and `terminal_error` a generation that ended without an answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from gateway.protocol import MAX_ID_CHARS, MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_STOP, MAX_STOP_CHARS
from llmstream.fold import RequestState, Status

Api = Literal["chat", "completions", "responses"]

MAX_TOKENS_BOUND = 1_000_000  # the WebSocket's bound of max_tokens
MAX_SEED = 2**63 - 1
# Stream positions (gateway/openai/sse.py): token seqs are uint32, a few terminal events follow.
MAX_POSITION = 2**32 + 16
# OpenAI's documented default of the legacy completions endpoint: a client that leaves
# max_tokens out gets what it would get from OpenAI.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# -- errors -------------------------------------------------------------------------------------

INVALID_REQUEST_ERROR = "invalid_request_error"
SERVER_ERROR = "server_error"


class OpenAIError(Exception):
    """A refusal or failure as OpenAI reports it: an HTTP status and an error body; in a stream,
    the same body as one event (docs/openai.md, "Errors")."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = INVALID_REQUEST_ERROR,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = error_type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        # The `x-should-retry` header the official SDKs obey (None: they decide by status;
        # they retry 408, 409, 429 and 5xx).
        self.should_retry = should_retry

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json(self) -> str:
        return dumps(self.body())

    def headers(self) -> dict[str, str]:
        out = {}
        if self.retry_after_s is not None:
            out["Retry-After"] = str(self.retry_after_s)
        if self.should_retry is not None:
            out["x-should-retry"] = "true" if self.should_retry else "false"
        return out

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, code={self.code!r})"


def invalid_value(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, message, code="invalid_value", param=param)


def invalid_type(param: str, expected: str) -> OpenAIError:
    return OpenAIError(
        400, f"Invalid type for '{param}': expected {expected}.", code="invalid_type", param=param
    )


def missing(param: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"Missing required parameter: '{param}'.",
        code="missing_required_parameter",
        param=param,
    )


def unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, code="unsupported_parameter", param=param)


def invalid_json() -> OpenAIError:
    return OpenAIError(
        400,
        "We could not parse the JSON body of your request: it must be one JSON object "
        "(NaN and Infinity are not JSON).",
    )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or is not served now.",
        code="model_not_found",
        param="model",
    )


def not_found(message: str) -> OpenAIError:
    return OpenAIError(404, message, code="not_found")


class Refusal(Protocol):
    """What `from_refusal` reads of a gateway refusal (gateway/errors.py's `GatewayError`)."""

    code: str
    message: str
    field: str | None
    reason: str
    retry_after_ms: int | None


def from_refusal(err: Refusal, req: GenerationRequest | None = None) -> OpenAIError:
    """A refusal of the gateway (codes of docs/protocol.md) in OpenAI's terms; `req` names the
    offending field as the client spelled it (`max_completion_tokens`, `input`, ...)."""
    retry_s = None if err.retry_after_ms is None else max(1, math.ceil(err.retry_after_ms / 1000))
    param = req.param(err.field) if req is not None and err.field else err.field
    code = err.code
    if code == "invalid_request":
        return invalid_value(param, err.message)
    if code == "context_overflow":
        return OpenAIError(400, err.message, code="context_length_exceeded", param=param)
    if code == "unauthorized":
        return OpenAIError(401, err.message, code="invalid_api_key")
    if code == "forbidden":
        return OpenAIError(403, err.message, code="forbidden")
    if code == "model_not_found":
        return OpenAIError(404, err.message, code="model_not_found", param="model")
    if code == "not_found":
        return not_found(err.message)
    if code == "quota_exceeded":
        # OpenAI's 429 types: which budget ran out, requests or tokens.
        kind = "tokens" if err.reason.startswith("tokens") else "requests"
        return OpenAIError(
            429, err.message, error_type=kind, code="rate_limit_exceeded", retry_after_s=retry_s
        )
    if code == "overloaded" and err.reason == "draining":
        return OpenAIError(
            503,
            err.message,
            error_type=SERVER_ERROR,
            code="service_unavailable",
            retry_after_s=retry_s,
        )
    if code == "overloaded":
        return OpenAIError(
            429,
            err.message,
            error_type=SERVER_ERROR,
            code="server_overloaded",
            retry_after_s=retry_s,
        )
    if code == "model_unavailable":
        return OpenAIError(
            503,
            err.message,
            error_type=SERVER_ERROR,
            code="model_unavailable",
            retry_after_s=retry_s,
        )
    return OpenAIError(
        500, err.message, error_type=SERVER_ERROR, code="internal_error", retry_after_s=retry_s
    )


# Finish reasons that are an answer; every other end of a generation is an error for OpenAI
# clients, so that a cut-off text is never taken for a complete one.
ANSWER_FINISH_REASONS = frozenset({"stop", "length", "content_filter"})
_FAILED_CODES = {
    "invalid_request": (400, INVALID_REQUEST_ERROR, "invalid_value"),
    "context_overflow": (400, INVALID_REQUEST_ERROR, "context_length_exceeded"),
    "model_not_found": (404, INVALID_REQUEST_ERROR, "model_not_found"),
    "model_unavailable": (503, SERVER_ERROR, "model_unavailable"),
}


def terminal_error(state: RequestState) -> OpenAIError | None:
    """The error of a request that ended without an answer (None: it answered). The same object
    is a non-streaming response's status and body and a stream's error event. Retrying such a
    request starts a new generation, so the SDKs are told not to, except when no model could
    take it."""
    if state.status is Status.COMPLETED and state.finish_reason in ANSWER_FINISH_REASONS:
        return None
    detail = state.finish_message
    if state.status is Status.CANCELLED:
        message = "The request was cancelled" + (f": {detail}" if detail else ".")
        return OpenAIError(409, message, code="request_cancelled", should_retry=False)
    if state.finish_reason == "timeout":
        return OpenAIError(
            504,
            "The generation reached its wall-time limit.",
            error_type=SERVER_ERROR,
            code="timeout",
            should_retry=False,
        )
    status, kind, code = _FAILED_CODES.get(state.error_code, (500, SERVER_ERROR, "internal_error"))
    return OpenAIError(
        status,
        detail or "The model failed to generate a response.",
        error_type=kind,
        code=code,
        should_retry=None if code == "model_unavailable" else False,
    )


# -- the neutral request ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as any OpenAI endpoint asked for it (exactly one of prompt or messages)."""

    api: Api
    model: str
    max_tokens: int | None  # None: the model's own limit decides
    max_tokens_param: str  # how the client named it: max_completion_tokens, max_output_tokens...
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # chat/completions: stream_options.include_usage
    background: bool = False  # responses

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
