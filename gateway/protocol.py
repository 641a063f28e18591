"""WebSocket protocol v1 (docs/protocol.md): client frames -> typed messages, server frames.

Pure: no I/O. `parse` turns one client frame into a `Submit`, `Cancel`, `Resume` or `Ping`,
or raises `ProtocolError` whose `frame()` is the `invalid_request` error to send back (it names
the offending field). Nothing here ever lets a traceback reach a client. `error_frame` is the
one WebSocket rendering of a `GatewayError`; `Frames` renders what a watch emits (tokens, done).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_str  # JSON string literal, non-ASCII kept
from typing import Any

from gateway.admission import ChatMessage as ChatMessage
from gateway.admission import SubmitRequest
from gateway.errors import FORBIDDEN as FORBIDDEN
from gateway.errors import INTERNAL as INTERNAL
from gateway.errors import INVALID_REQUEST as INVALID_REQUEST
from gateway.errors import NOT_FOUND as NOT_FOUND
from gateway.errors import OVERLOADED as OVERLOADED
from gateway.errors import QUOTA_EXCEEDED as QUOTA_EXCEEDED
from gateway.errors import UNAUTHORIZED as UNAUTHORIZED
from gateway.errors import GatewayError
from llmstream.fold import RequestState

PROTOCOL = "llmstream.v1"

# Close codes.
CLOSE_SLOW_CONSUMER = 4008  # send buffer full: reconnect and resume
CLOSE_UNAUTHORIZED = 4401  # key revoked / session ended
CLOSE_DRAIN = 1012  # service restart: reconnect (to another replica) and resume

MAX_PROMPT_CHARS = 32_000
MAX_MESSAGES = 64
MAX_STOP = 8
MAX_STOP_CHARS = 64
MAX_ID_CHARS = 128
# What the server's `hello` offers and a client's `hello` may ask for (docs/protocol.md).
TOKENS = "tokens"  # several tokens of one request in one `tokens` frame
CAPABILITIES = (TOKENS,)
MAX_CAPABILITIES = 16
ROLES = frozenset({"system", "user", "assistant"})


class ProtocolError(GatewayError):
    """A client frame is unusable (`invalid_request`); `frame()` is the error frame to send."""

    def __init__(
        self, message: str, field_name: str | None = None, client_ref: str | None = None
    ) -> None:
        super().__init__(INVALID_REQUEST, message, field=field_name)
        self.client_ref = client_ref

    def frame(self) -> str:
        return error_frame(self, self.client_ref)


@dataclass(frozen=True)
class Submit(SubmitRequest):
    """A submit frame: the protocol-neutral request the admission takes, plus `client_ref`."""

    client_ref: str | None = None


@dataclass(frozen=True)
class Cancel:
    request_id: str
    client_ref: str | None = None


@dataclass(frozen=True)
class Resume:
    request_id: str
    after_seq: int = 0
    client_ref: str | None = None


@dataclass(frozen=True)
class Hello:
    """A client's hello: the capabilities it takes (unknown ones are ignored)."""

    capabilities: frozenset[str] = frozenset()
    client_ref: str | None = None


@dataclass(frozen=True)
class Ping:
    data: Any = None
    # `{"type":"pong",...}` serialized at parse time: data that cannot be echoed (a lone
    # surrogate, nesting at the recursion limit) is refused as the client's error, not ours.
    reply: str = field(default="", compare=False)


Message = Submit | Cancel | Resume | Ping | Hello


def _field(obj: dict[str, Any], name: str, ref: str | None, required: bool) -> Any:
    value = obj.get(name)
    if value is None and required:
        raise ProtocolError(f"`{name}` is required", name, ref)
    return value


def _str(
    obj: dict[str, Any],
    name: str,
    ref: str | None,
    *,
    required: bool = False,
    max_chars: int = MAX_ID_CHARS,
    allow_empty: bool = False,
) -> str | None:
    value = _field(obj, name, ref, required)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"`{name}` must be a string", name, ref)
    if not value and not allow_empty:
        raise ProtocolError(f"`{name}` must not be empty", name, ref)
    if len(value) > max_chars:
        raise ProtocolError(f"`{name}` is longer than {max_chars} characters", name, ref)
    _check_unicode(value, name, ref)
    return value


def _check_unicode(value: str, name: str, ref: str | None) -> None:
    """JSON can carry a lone surrogate (`"\\ud800"`) that no UTF-8 encoder accepts: it could
    neither be echoed to the client nor written into a protobuf event."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(
                f"`{name}` is not valid Unicode (lone surrogate)", name, ref
            ) from None


def _int(
    obj: dict[str, Any], name: str, ref: str | None, lo: int, hi: int, *, required: bool = False
) -> int | None:
    value = _field(obj, name, ref, required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"`{name}` must be an integer", name, ref)
    if not lo <= value <= hi:
        raise ProtocolError(f"`{name}` must be between {lo} and {hi}", name, ref)
    return value


def _float(
    obj: dict[str, Any], name: str, ref: str | None, lo: float, hi: float, lo_open: bool = False
) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(f"`{name}` must be a number", name, ref)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = "(" if lo_open else "["
        raise ProtocolError(f"`{name}` must be in {bound}{lo}, {hi}]", name, ref)
    return float(value)


def _messages(raw: Any, ref: str | None) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("`messages` must be a non-empty list", "messages", ref)
    if len(raw) > MAX_MESSAGES:
        raise ProtocolError(f"`messages` has more than {MAX_MESSAGES} items", "messages", ref)
    messages: list[ChatMessage] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ProtocolError(f"`{where}` must be an object", where, ref)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise ProtocolError(
                f"`{where}.role` must be one of {sorted(ROLES)}", f"{where}.role", ref
            )
        if not isinstance(content, str):
            raise ProtocolError(f"`{where}.content` must be a string", f"{where}.content", ref)
        _check_unicode(content, f"{where}.content", ref)
        messages.append(ChatMessage(str(role), content))
    if sum(len(m.content) for m in messages) > MAX_PROMPT_CHARS:
        raise ProtocolError(
            f"`messages` are longer than {MAX_PROMPT_CHARS} characters", "messages", ref
        )
    return tuple(messages)


def _stop(raw: Any, ref: str | None) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or len(raw) > MAX_STOP:
        raise ProtocolError(f"`stop` must be a list of at most {MAX_STOP} strings", "stop", ref)
    for s in raw:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise ProtocolError(
                f"`stop` items must be non-empty strings of at most {MAX_STOP_CHARS} characters",
                "stop",
                ref,
            )
        _check_unicode(s, "stop", ref)
    return tuple(raw)


def _submit(obj: dict[str, Any], ref: str | None) -> Submit:
    model = _str(obj, "model", ref, required=True)
    assert model is not None
    max_tokens = _int(obj, "max_tokens", ref, 1, 1_000_000, required=True)
    assert max_tokens is not None
    if (obj.get("prompt") is None) == (obj.get("messages") is None):
        raise ProtocolError("exactly one of `prompt` or `messages` is required", "prompt", ref)
    prompt = _str(obj, "prompt", ref, max_chars=MAX_PROMPT_CHARS)
    messages = _messages(obj["messages"], ref) if prompt is None else ()
    stop = _stop(obj.get("stop", []), ref)
    return Submit(
        model=model,
        max_tokens=max_tokens,
        prompt=prompt,
        messages=messages,
        temperature=_float(obj, "temperature", ref, 0.0, 2.0),
        top_p=_float(obj, "top_p", ref, 0.0, 1.0, lo_open=True),
        seed=_int(obj, "seed", ref, 0, 2**63 - 1),
        stop=stop,
        idempotency_key=_str(obj, "idempotency_key", ref),
        client_ref=ref,
    )


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259); echoing them would break browsers' JSON.parse.
    raise ValueError(f"{name} is not JSON")


def parse(frame: str | bytes, max_bytes: int = 65536) -> Message:
    """One client frame -> message, or `ProtocolError` naming what is wrong."""
    if isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError("binary frames are not supported; send JSON text frames", "frame")
    if len(frame) > max_bytes or len(frame.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError(f"frame is larger than {max_bytes} bytes", "frame")
    try:
        obj = json.loads(frame, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise ProtocolError("frame is not valid JSON", "frame") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame must be a JSON object", "frame")
    ref_raw = obj.get("client_ref")
    ref = ref_raw if isinstance(ref_raw, str) and len(ref_raw) <= MAX_ID_CHARS else None
    if ref_raw is not None and ref is None:
        raise ProtocolError(
            f"`client_ref` must be a string of at most {MAX_ID_CHARS} characters", "client_ref"
        )
    if ref is not None:
        _check_unicode(ref, "client_ref", None)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("`type` is required (a string)", "type", ref)
    if kind == "submit":
        return _submit(obj, ref)
    if kind == "cancel":
        rid = _str(obj, "request_id", ref, required=True)
        assert rid is not None
        return Cancel(rid, ref)
    if kind == "resume":
        rid = _str(obj, "request_id", ref, required=True)
        assert rid is not None
        after = _int(obj, "after_seq", ref, 0, 2**32 - 1) or 0
        return Resume(rid, after, ref)
    if kind == "hello":
        caps = obj.get("capabilities", [])
        if (
            not isinstance(caps, list)
            or len(caps) > MAX_CAPABILITIES
            or not all(isinstance(c, str) and len(c) <= MAX_ID_CHARS for c in caps)
        ):
            raise ProtocolError(
                f"`capabilities` must be a list of at most {MAX_CAPABILITIES} strings",
                "capabilities",
                ref,
            )
        return Hello(frozenset(caps) & frozenset(CAPABILITIES), ref)
    if kind == "ping":
        data = obj.get("data")
        try:
            reply = pong(data)
            reply.encode("utf-8")
        except (ValueError, RecursionError):
            raise ProtocolError("`data` cannot be echoed as JSON", "data", ref) from None
        return Ping(data, reply)
    raise ProtocolError(f"unknown frame type {kind[:40]!r}", "type", ref)


# ---- server frames -------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Text that always encodes as UTF-8 (lone surrogates become U+FFFD)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def hello(gateway_id: str, heartbeat_ms: int, tenant_id: str, default_model: str = "") -> str:
    return _dump(
        {
            "type": "hello",
            "protocol": PROTOCOL,
            "gateway_id": gateway_id,
            "tenant_id": tenant_id,
            "heartbeat_ms": heartbeat_ms,
            "default_model": default_model,
            "capabilities": list(CAPABILITIES),
        }
    )


def accepted(
    request_id: str,
    client_ref: str | None,
    max_tokens: int,
    *,
    capped: str | None = None,
    existing: bool = False,
) -> str:
    out: dict[str, Any] = {"type": "accepted", "request_id": request_id, "max_tokens": max_tokens}
    if client_ref is not None:
        out["client_ref"] = client_ref
    if capped:
        out["max_tokens_capped"] = capped
    if existing:
        out["existing"] = True
    return _dump(out)


def token(request_id: str, seq: int, text: str) -> str:
    # The hot path (one per token event and socket): the same text as `_dump` of
    # {"type", "request_id", "seq", "text"}, built 8x faster than through json.dumps.
    return (
        f'{{"type":"token","request_id":{_json_str(request_id)},"seq":{int(seq)},'
        f'"text":{_json_str(clean_text(text))}}}'
    )


def tokens(request_id: str, last_seq: int, texts: list[str]) -> str:
    """Several consecutive tokens of one request (a socket that took the `tokens` capability):
    `seq` is the last one's, as in `token`; `texts[i]` has seq `seq - len(texts) + 1 + i`."""
    items = ",".join(_json_str(clean_text(t)) for t in texts)
    return (
        f'{{"type":"tokens","request_id":{_json_str(request_id)},"seq":{int(last_seq)},'
        f'"texts":[{items}]}}'
    )


@dataclass(frozen=True)
class Done:
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    last_seq: int
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    total_ms: float | None = None
    message: str = ""
    error_code: str = ""

    def frame(self) -> str:
        out: dict[str, Any] = {
            "type": "done",
            "request_id": self.request_id,
            "finish_reason": self.finish_reason,
            "last_seq": self.last_seq,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
            "metrics": {
                "ttft_ms": self.ttft_ms,
                "tokens_per_s": self.tokens_per_s,
                "total_ms": self.total_ms,
            },
        }
        if self.message:
            out["message"] = clean_text(self.message)
        if self.error_code:
            out["error_code"] = self.error_code
        return _dump(out)


def error_frame(err: GatewayError, client_ref: str | None = None) -> str:
    """The `error` frame of a `GatewayError` (the one WebSocket rendering of every error);
    `client_ref` is that of the frame it answers."""
    out: dict[str, Any] = {"type": "error", "code": err.code, "message": err.message}
    if err.request_id is not None:
        out["request_id"] = err.request_id
    if client_ref is not None:
        out["client_ref"] = client_ref
    if err.field is not None:
        out["field"] = err.field
    if err.retry_after_ms is not None:
        out["retry_after_ms"] = err.retry_after_ms
    if err.reason:  # machine-readable cause within the code (the quota limit, rate_limited, ...)
        out["reason"] = err.reason
    return _dump(out)


def pong(data: Any = None) -> str:
    out: dict[str, Any] = {"type": "pong"}
    if data is not None:
        out["data"] = data
    return _dump(out)


def heartbeat(now_ms: int) -> str:
    return _dump({"type": "heartbeat", "ts": now_ms})


def done_frame(state: RequestState) -> str:
    """The `done` frame of a terminal request state; metrics from the events' wall clocks."""
    tokens_per_s = None
    total_ms = None
    if state.finished_at_ms is not None and state.submitted_at_ms is not None:
        total_ms = float(state.finished_at_ms - state.submitted_at_ms)
    if state.first_token_at_ms is not None and state.finished_at_ms is not None:
        span = (state.finished_at_ms - state.first_token_at_ms) / 1000
        if span > 0 and state.completion_tokens > 1:
            tokens_per_s = round((state.completion_tokens - 1) / span, 1)
    ttft = state.ttft_ms
    return Done(
        request_id=state.request_id,
        finish_reason=state.finish_reason or state.status.value,
        prompt_tokens=state.prompt_tokens,
        completion_tokens=state.completion_tokens,
        last_seq=state.last_seq,
        ttft_ms=float(ttft) if ttft is not None else None,
        tokens_per_s=tokens_per_s,
        total_ms=total_ms,
        message=state.finish_message,
        error_code=state.error_code,
    ).frame()


class Frames:
    """What a watch (gateway/router.py) queues on a WebSocket: `token` and `done` frames."""

    @staticmethod
    def token(request_id: str, seq: int, text: str) -> str:
        return token(request_id, seq, text)

    @staticmethod
    def done(state: RequestState) -> str:
        return done_frame(state)
