"""OpenAI's errors: `{"error": {"message", "type", "code", "param"}}` with an HTTP status.

Every refusal of the OpenAI front end is an `OpenAIError`: the request checks of
gateway/openai/protocol.py raise them, `from_refusal` renders the gateway's own refusals
(admission, quota, auth: gateway/errors.py's codes), and `terminal_error` a generation that
ended without an answer, which is an HTTP answer without streaming and the last event of a
stream (docs/openai.md, "Errors").
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Protocol

from llmstream.fold import RequestState, Status

if TYPE_CHECKING:
    from gateway.openai.protocol import GenerationRequest

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
        return json.dumps(self.body(), ensure_ascii=False, separators=(",", ":"))

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
    if err.reason == "outcome_unknown":  # the request may run: retry with the same key
        return OpenAIError(
            500,
            err.message,
            error_type=SERVER_ERROR,
            code="outcome_unknown",
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
    # The worker's checks before any model call (docs/events.md `failed`): never billed.
    "limit_exceeded": (400, INVALID_REQUEST_ERROR, "limit_exceeded"),  # beyond the tenant's tier
    "unknown_tenant": (403, INVALID_REQUEST_ERROR, "unknown_tenant"),  # unknown or disabled
    "tier_unavailable": (503, SERVER_ERROR, "tier_unavailable"),  # the tier could not be read
    "dead_lettered": (500, SERVER_ERROR, "dead_lettered"),  # the submit was unreadable: DLQ
}
# Failed before any model call and for a passing reason: a retry is safe (and unbilled).
_RETRYABLE_CODES = frozenset({"model_unavailable", "tier_unavailable"})


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
        should_retry=None if code in _RETRYABLE_CODES else False,
    )
