"""OpenAI request bodies -> the neutral request; every refusal (ours, the gateway's, a generation
without an answer) in OpenAI's error shape with the right status, code and param."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from openai.types.shared import ErrorObject

from gateway.admission import ChatMessage
from gateway.errors import GatewayError, draining, overloaded, quota_exceeded
from gateway.openai import errors, protocol
from gateway.openai.errors import OpenAIError
from gateway.openai.protocol import StreamContext
from llmstream.fold import RequestState, Status


def refused(parse: Callable[[Any], object], arg: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as err:
        parse(arg)
    ErrorObject.model_validate(err.value.body()["error"], strict=True)  # OpenAI's own shape
    return err.value


CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


# -- chat ---------------------------------------------------------------------------------------


def test_chat_body_becomes_the_neutral_request() -> None:
    req = protocol.parse_chat(
        {
            "model": "smollm2",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "name": "bot"},
            ],
            "max_tokens": 7,
            "max_completion_tokens": 9,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 42,
            "stop": "\n",
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
            "presence_penalty": 0.5,
            "some_future_field": {"x": 1},
        }
    )  # fmt: skip
    assert req.api == "chat"
    assert req.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "a\nb"),
        ChatMessage("assistant", "ok"),
    )
    assert (req.max_tokens, req.max_tokens_param) == (9, "max_completion_tokens")
    assert (req.temperature, req.top_p, req.seed, req.stop) == (0.0, 0.5, 42, ("\n",))
    assert req.stream and req.include_usage and req.prompt is None
    assert req.param("max_tokens") == "max_completion_tokens"


def test_chat_defaults() -> None:
    req = protocol.parse_chat(CHAT)
    assert (req.max_tokens, req.max_tokens_param) == (None, "max_completion_tokens")
    assert not req.stream and not req.include_usage and req.stop == ()
    legacy = protocol.parse_chat({**CHAT, "max_tokens": 5})
    assert (legacy.max_tokens, legacy.max_tokens_param) == (5, "max_tokens")


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"n": "1"}, "n", "invalid_type"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "audio", "unsupported_parameter"),
        ({"model": None}, "model", "missing_required_parameter"),
        ({"model": 3}, "model", "invalid_type"),
        ({"messages": None}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}]}, "messages[0].role", "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "invalid_type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[1].type", "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "invalid_value"),
        ({"messages": [{"role": "user", "content": "x" * 32_001}]}, "messages", "invalid_value"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ({"max_tokens": True}, "max_tokens", "invalid_type"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"seed": -1}, "seed", "invalid_value"),
        ({"stop": ["a"] * 9}, "stop", "invalid_value"),
        ({"stop": [""]}, "stop", "invalid_value"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "invalid_type"),
    ],
)  # fmt: skip
def test_chat_refusals_name_the_param(change: dict[str, Any], param: str, code: str) -> None:
    err = refused(protocol.parse_chat, {**CHAT, **change})
    assert (err.status, err.type, err.param, err.code) == (
        400,
        "invalid_request_error",
        param,
        code,
    )


def test_body_must_be_one_json_object() -> None:
    for raw in (b"{", b"[1]", b'{"a": NaN}', b"\xff"):
        with pytest.raises(OpenAIError) as err:
            protocol.parse_json(raw)
        assert err.value.status == 400 and err.value.param is None
    assert protocol.parse_json(b'{"model": "m"}') == {"model": "m"}


# -- completions --------------------------------------------------------------------------------


def test_completion_body_and_openai_default_max_tokens() -> None:
    req = protocol.parse_completion({"model": "m", "prompt": ["Once"], "stop": ["."]})
    assert (req.api, req.prompt, req.messages, req.stop) == ("completions", "Once", (), (".",))
    assert (req.max_tokens, req.max_tokens_param) == (16, "max_tokens")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
        ({"n": 3}, "n"),
    ],
)
def test_completion_refusals(change: dict[str, Any], param: str) -> None:
    err = refused(protocol.parse_completion, {"model": "m", "prompt": "x", **change})
    assert (err.status, err.param) == (400, param)


# -- responses ----------------------------------------------------------------------------------


def test_response_body_with_text_input_and_instructions() -> None:
    req = protocol.parse_response(
        {"model": "m", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 20,
         "background": True, "stream": True, "reasoning": {"effort": "low"}}
    )  # fmt: skip
    assert req.api == "responses"
    assert req.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    assert (req.max_tokens, req.max_tokens_param, req.background, req.stream) == (
        20, "max_output_tokens", True, True,
    )  # fmt: skip
    assert req.param("messages[1].content") == "input"


def test_response_input_items() -> None:
    req = protocol.parse_response(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "a"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "c"}]},
            ],
        }
    )  # fmt: skip
    assert [m.content for m in req.messages] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": None}, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"background": True, "store": False}, "store"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"instructions": 5}, "instructions"),
    ],
)  # fmt: skip
def test_response_refusals(change: dict[str, Any], param: str) -> None:
    err = refused(protocol.parse_response, {"model": "m", "input": "x", **change})
    assert (err.status, err.param) == (400, param)


# -- headers and query parameters ----------------------------------------------------------------


def test_idempotency_key_and_query_parameters() -> None:
    assert protocol.idempotency_key(None) is None
    assert protocol.idempotency_key("k-1") == "k-1"
    for bad in ("", "k" * 129):
        assert refused(protocol.idempotency_key, bad).param == "Idempotency-Key"
    assert protocol.starting_after(None) == -1
    assert protocol.starting_after("12") == 12
    assert refused(protocol.starting_after, "-1").param == "starting_after"
    assert protocol.query_flag("true", "stream") and not protocol.query_flag(None, "stream")
    assert refused(lambda raw: protocol.query_flag(raw, "stream"), "maybe").param == "stream"


# -- the gateway's refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "status", "kind", "code", "headers"),
    [
        (quota_exceeded("requests_per_minute", 1500), 429, "requests", "rate_limit_exceeded", {"Retry-After": "2"}),
        (quota_exceeded("tokens_per_day", 3_600_000), 429, "tokens", "rate_limit_exceeded", {"Retry-After": "3600"}),
        (overloaded(), 429, "server_error", "server_overloaded", {"Retry-After": "1"}),
        (draining(), 503, "server_error", "service_unavailable", {"Retry-After": "1"}),
        (GatewayError("unauthorized", "invalid API key"), 401, "invalid_request_error", "invalid_api_key", {}),
        (GatewayError("forbidden", "origin not allowed"), 403, "invalid_request_error", "forbidden", {}),
        (GatewayError("not_found", "no such request"), 404, "invalid_request_error", "not_found", {}),
        (GatewayError("model_not_found", "no model x"), 404, "invalid_request_error", "model_not_found", {}),
        (GatewayError("internal", "internal error"), 500, "server_error", "internal_error", {}),
    ],
)  # fmt: skip
def test_gateway_refusals_in_openai_terms(
    err: GatewayError, status: int, kind: str, code: str, headers: dict[str, str]
) -> None:
    out = errors.from_refusal(err)
    assert (out.status, out.type, out.code, out.headers()) == (status, kind, code, headers)
    assert out.body()["error"]["message"] == err.message


def test_a_refused_field_is_named_as_the_client_sent_it() -> None:
    cap = GatewayError("invalid_request", "above the model's limit of 1024", field="max_tokens")
    chat = protocol.parse_chat({**CHAT, "max_completion_tokens": 5000})
    assert errors.from_refusal(cap, chat).param == "max_completion_tokens"
    resp = protocol.parse_response({"model": "m", "input": "x", "max_output_tokens": 5000})
    assert errors.from_refusal(cap, resp).param == "max_output_tokens"
    assert errors.from_refusal(cap).param == "max_tokens"


# -- generations without an answer ---------------------------------------------------------------


def state(
    status: Status, finish_reason: str, error_code: str = "", message: str = ""
) -> RequestState:
    return RequestState(
        "req_1", status=status, finish_reason=finish_reason, error_code=error_code,
        finish_message=message,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("st", "status", "code", "retry_header"),
    [
        (state(Status.CANCELLED, "cancelled", message="client"), 409, "request_cancelled", "false"),
        (state(Status.COMPLETED, "timeout"), 504, "timeout", "false"),
        (state(Status.FAILED, "error", "context_overflow", "prompt too long"), 400, "context_length_exceeded", "false"),
        (state(Status.FAILED, "error", "model_not_found"), 404, "model_not_found", "false"),
        (state(Status.FAILED, "error", "model_unavailable"), 503, "model_unavailable", None),
        (state(Status.FAILED, "error", "limit_exceeded", "max_tokens above the tier"), 400, "limit_exceeded", "false"),
        (state(Status.FAILED, "error", "unknown_tenant"), 403, "unknown_tenant", "false"),
        (state(Status.FAILED, "error", "tier_unavailable"), 503, "tier_unavailable", None),
        (state(Status.FAILED, "error", "dead_lettered"), 500, "dead_lettered", "false"),
        (state(Status.FAILED, "error", "internal"), 500, "internal_error", "false"),
        (state(Status.FAILED, "error", message="engine crashed"), 500, "internal_error", "false"),
    ],
)  # fmt: skip
def test_terminal_errors(
    st: RequestState, status: int, code: str, retry_header: str | None
) -> None:
    err = errors.terminal_error(st)
    assert err is not None
    assert (err.status, err.code, err.headers().get("x-should-retry")) == (
        status,
        code,
        retry_header,
    )
    ErrorObject.model_validate(err.body()["error"], strict=True)
    assert err.body()["error"]["type"] == (
        "invalid_request_error" if status < 500 else "server_error"
    )


def test_answers_are_not_errors() -> None:
    for reason in ("stop", "length", "content_filter"):
        assert errors.terminal_error(state(Status.COMPLETED, reason)) is None


def test_stream_context_round_trips_through_the_store() -> None:
    req = protocol.parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    ctx = StreamContext.of(req, "req_1", 1_700_000_000_123, 64)
    assert (ctx.created, ctx.max_tokens, ctx.include_usage) == (1_700_000_000, 64, True)
    assert StreamContext.loads(ctx.dumps()) == ctx
    for bad in ("{", "[]", '{"api": "chat"}', ctx.dumps().replace('"chat"', '"embeddings"')):
        with pytest.raises(ValueError, match="not a stream context"):
            StreamContext.loads(bad)
