"""The one error type of the gateway, whatever the front end.

Everything the gateway refuses or fails (admission, resume, auth, upgrades, HTTP routes) raises
a `GatewayError`. Front ends render it once each: the WebSocket as an `error` frame
(`protocol.error_frame`), the HTTP routes as JSON with a status (`http.error_response`), the
OpenAI-compatible routes as OpenAI errors. The codes are the WebSocket protocol's
(docs/protocol.md, "Error codes").
"""

from __future__ import annotations

UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
INVALID_REQUEST = "invalid_request"
QUOTA_EXCEEDED = "quota_exceeded"
OVERLOADED = "overloaded"
NOT_FOUND = "not_found"
INTERNAL = "internal"
MODEL_NOT_FOUND = "model_not_found"
MODEL_UNAVAILABLE = "model_unavailable"


class GatewayError(Exception):
    """A refusal or failure to report to the client.

    `retry_after_ms` set means the client may retry the same thing then (`retryable`);
    `field` names the offending input of an `invalid_request`; `reason` is the machine-readable
    cause within the code (the quota limit, `draining`, ...) for metrics and front ends that
    have finer codes."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after_ms: int | None = None,
        field: str | None = None,
        request_id: str | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.field = field
        self.request_id = request_id
        self.reason = reason

    @property
    def retryable(self) -> bool:
        return self.retry_after_ms is not None

    def __repr__(self) -> str:
        return f"GatewayError({self.code!r}, {self.message!r}, reason={self.reason!r})"


# The refusals raised from more than one place, each worded once.


def not_found(request_id: str | None = None) -> GatewayError:
    return GatewayError(NOT_FOUND, "no such request", request_id=request_id)


def draining() -> GatewayError:
    return GatewayError(OVERLOADED, "draining", retry_after_ms=500, reason="draining")


def overloaded(
    message: str = "gateway overloaded, retry later", request_id: str | None = None
) -> GatewayError:
    return GatewayError(
        OVERLOADED, message, retry_after_ms=1000, request_id=request_id, reason="overloaded"
    )


def quota_exceeded(limit: str, retry_after_ms: int) -> GatewayError:
    return GatewayError(
        QUOTA_EXCEEDED, f"quota exceeded: {limit}", retry_after_ms=retry_after_ms, reason=limit
    )


def model_not_found(model: str) -> GatewayError:
    """The model catalog lists no such model (gateway/models.py)."""
    return GatewayError(
        MODEL_NOT_FOUND, f"model {model!r} is not served", field="model", reason="model"
    )


def model_unavailable(model: str, retry_after_ms: int) -> GatewayError:
    """The model was served, but no model server has announced it lately."""
    return GatewayError(
        MODEL_UNAVAILABLE,
        f"model {model!r} is not served now (no model server announced it lately)",
        field="model",
        retry_after_ms=retry_after_ms,
        reason="model",
    )


def internal(
    message: str = "internal error",
    *,
    request_id: str | None = None,
    retry_after_ms: int | None = 1000,
) -> GatewayError:
    """Something failed inside the gateway (details only in the server log)."""
    return GatewayError(INTERNAL, message, request_id=request_id, retry_after_ms=retry_after_ms)


def resume_failed(request_id: str) -> GatewayError:
    """A resume could not set up its reads; without them the stream would have a gap."""
    return internal("resume failed, try again", request_id=request_id)


def outcome_unknown(request_id: str, idempotent: bool) -> GatewayError:
    """The prompt was handed to Kafka, which did not confirm it in time: the request may run
    (and be billed). Following `request_id` shows it; a retry with the same idempotency key
    answers with this same request, never a second one."""
    retry = "resume it, or retry with the same idempotency key" if idempotent else "resume it"
    return GatewayError(
        INTERNAL,
        f"outcome unknown: Kafka did not confirm the request in time and it may still run; "
        f"{retry} (either follows this request, never a second one)",
        request_id=request_id,
        retry_after_ms=1000,
        reason="outcome_unknown",
    )


def rate_limited(frame: str, retry_after_ms: int) -> GatewayError:
    """Too many cancel or resume frames (per socket or per tenant: gateway/limits.py)."""
    return GatewayError(
        QUOTA_EXCEEDED,
        f"too many {frame} frames: retry in {retry_after_ms} ms",
        retry_after_ms=retry_after_ms,
        reason="rate_limited",
    )


def too_many_watches(limit: int) -> GatewayError:
    """A socket already follows `limit` unfinished requests."""
    return GatewayError(
        QUOTA_EXCEEDED,
        f"this socket follows {limit} unfinished requests, the most it may: open another "
        "socket or wait for some to finish",
        retry_after_ms=1000,
        reason="watches",
    )
