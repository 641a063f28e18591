"""`/v1/responses` (the subset of docs/openai.md): a request's events -> the Responses API's
streaming events, and its state at any time -> a `response` object (`GET /v1/responses/{id}`,
a background submit, a cancel, a non-streaming answer).

Every event has a `sequence_number`, which is also its position (`id: <request_id>:<n>`), so
`?starting_after=N` and `Last-Event-ID` resume alike, on any replica:

| sequence_number | event |
|---|---|
| 0 | `response.created` (status `queued` for a background response, else `in_progress`) |
| 1 | `response.in_progress` |
| 2 | `response.output_item.added` (the assistant message, empty) |
| 3 | `response.content_part.added` (its `output_text` part, empty) |
| k + 3 | `response.output_text.delta` of the token event of seq k |
| L + 4 ... L + 7 | answered (L = last seq): `response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then `response.completed` or `response.incomplete` |
| L + 4 | not answered: `response.failed` (error) or `response.incomplete` with status `cancelled` |

A Responses stream has no `[DONE]`: the terminal event ends it.
"""

from __future__ import annotations

from json.encoder import encode_basestring as json_str  # JSON string literal, non-ASCII kept
from typing import Any

from gateway.openai import sse
from gateway.openai.errors import not_found, terminal_error
from gateway.openai.protocol import StreamContext, dumps
from llmstream.fold import RequestState, Status

RESPONSE_PREFIX = "resp_"
PREAMBLE = 4  # events before the first delta (sequence numbers 0-3)


def response_id(request_id: str) -> str:
    return RESPONSE_PREFIX + request_id


def request_id_of(resp_id: str) -> str:
    """The request id inside a response id; 404 for an id that is not a response's."""
    request_id = resp_id.removeprefix(RESPONSE_PREFIX)
    if request_id == resp_id or not request_id:
        raise not_found(f"No response found with id '{resp_id}'.")
    return request_id


def message_id(request_id: str) -> str:
    return f"msg_{request_id}"


# -- status -------------------------------------------------------------------------------------

_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def status_of(state: RequestState | None) -> str:
    """The response's status from its request's state (None: no event folded yet)."""
    if state is None or state.status in (Status.UNKNOWN, Status.QUEUED):
        return "queued"
    if state.status is Status.RUNNING:
        return "in_progress"
    if state.status is Status.CANCELLED:
        return "cancelled"
    if state.status is Status.COMPLETED and state.finish_reason in _INCOMPLETE_REASONS:
        return "incomplete"
    if state.status is Status.COMPLETED and state.finish_reason == "stop":
        return "completed"
    return "failed"  # an engine error, a failure, a timeout


def _error(state: RequestState) -> dict[str, str] | None:
    err = terminal_error(state)
    if err is None or state.status is Status.CANCELLED:
        return None
    # The Responses API's error codes: a prompt the model cannot take, or a server error.
    invalid = state.error_code in ("invalid_request", "context_overflow")
    return {"code": "invalid_prompt" if invalid else "server_error", "message": err.message}


def _message(ctx: StreamContext, status: str, text: str) -> dict[str, Any]:
    return {
        "id": message_id(ctx.request_id),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(
    ctx: StreamContext, state: RequestState | None, *, status: str | None = None
) -> dict[str, Any]:
    """The `response` object of a request in any state; `status` overrides the derived one
    (the first events of a stream describe the response before any event was folded)."""
    status = status or status_of(state)
    terminal = state is not None and state.terminal
    output = []
    if state is not None and (state.last_seq or terminal):
        item_status = {"in_progress": "in_progress", "completed": "completed"}.get(
            status, "incomplete"
        )
        output.append(_message(ctx, item_status, state.text))
    finish_reason = state.finish_reason if state is not None else ""
    incomplete = _INCOMPLETE_REASONS.get(finish_reason) if status == "incomplete" else None
    return {
        "id": response_id(ctx.request_id),
        "object": "response",
        "created_at": ctx.created,
        "status": status,
        "background": ctx.background,
        "error": _error(state) if terminal and state is not None else None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": None,
        "max_output_tokens": ctx.max_tokens,
        "model": ctx.model,
        "output": output,
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "store": True,
        "temperature": 1.0 if ctx.temperature is None else ctx.temperature,
        "top_p": 1.0 if ctx.top_p is None else ctx.top_p,
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "truncation": "disabled",
        "usage": _usage(state) if terminal and state is not None else None,
        "metadata": {},
        "completed_at": _seconds(state.finished_at_ms)
        if status == "completed" and state is not None
        else None,
    }


def _usage(state: RequestState) -> dict[str, Any]:
    return {
        "input_tokens": state.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": state.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": state.prompt_tokens + state.completion_tokens,
    }


def _seconds(ms: int | None) -> int | None:
    return None if ms is None else ms // 1000


def response_body(ctx: StreamContext, state: RequestState) -> dict[str, Any]:
    """A non-streaming, foreground `POST /v1/responses` answer: the terminal response; raises the
    `OpenAIError` to answer with when the generation ended without an answer (as chat does;
    `incomplete` is an answer)."""
    err = terminal_error(state)
    if err is not None:
        raise err
    return response_object(ctx, state)


# -- the stream ---------------------------------------------------------------------------------


class ResponseStream:
    """The events of one Responses stream for one SSE client (gateway/router.py's `Frames`:
    `token` for each new token event, `done` at the terminal state); `after` is the sequence
    number the client already has (`starting_after`, or the position of `Last-Event-ID`)."""

    def __init__(self, ctx: StreamContext, after: int = -1) -> None:
        self.ctx = ctx
        self.cursor = sse.Cursor(ctx.request_id, after)
        self._item = message_id(ctx.request_id)
        # Built once: the delta event is the hot path (one per token event and client).
        self._delta_head = (
            '{"type":"response.output_text.delta","item_id":' + json_str(self._item) + ","
            '"output_index":0,"content_index":0,"logprobs":[],"delta":'
        )
        self._opened = False

    @property
    def token_after_seq(self) -> int:
        """Token events the client still needs: those with a seq above this."""
        return max(0, self.cursor.after - (PREAMBLE - 1))

    def opening(self) -> str:
        """Sequence numbers 0-3; send them at once, before the model's first token."""
        if self._opened:
            return ""
        self._opened = True
        first = "queued" if self.ctx.background else "in_progress"
        ids = {"item_id": self._item, "output_index": 0}
        return (
            self._event(0, "response.created", response=self._object(None, first))
            + self._event(1, "response.in_progress", response=self._object(None, "in_progress"))
            + self._event(
                2,
                "response.output_item.added",
                output_index=0,
                item={**_message(self.ctx, "in_progress", ""), "content": []},
            )
            + self._event(
                3, "response.content_part.added", **ids, content_index=0, part=_text_part("")
            )
        )

    def token(self, request_id: str, seq: int, text: str) -> str:
        out = self.opening()
        if text:
            number = seq + PREAMBLE - 1
            data = f'{self._delta_head}{json_str(text)},"sequence_number":{number}}}'
            out += self.cursor.event(number, data, name="response.output_text.delta")
        return out

    def done(self, state: RequestState) -> str:
        out = self.opening()
        end = state.last_seq + PREAMBLE
        response = response_object(self.ctx, state)
        status = response["status"]
        if status == "failed":
            return out + self._event(end, "response.failed", response=response)
        if status == "cancelled":
            # No Responses event is named for a cancel: `response.incomplete` is the terminal
            # event clients handle, and the status in it says what happened.
            return out + self._event(end, "response.incomplete", response=response)
        ids = {"item_id": self._item, "output_index": 0}
        item = response["output"][0]
        terminal = "response.completed" if status == "completed" else "response.incomplete"
        return (
            out
            + self._event(
                end,
                "response.output_text.done",
                **ids,
                content_index=0,
                text=state.text,
                logprobs=[],
            )
            + self._event(
                end + 1,
                "response.content_part.done",
                **ids,
                content_index=0,
                part=_text_part(state.text),
            )
            + self._event(end + 2, "response.output_item.done", output_index=0, item=item)
            + self._event(end + 3, terminal, response=response)
        )

    def _object(self, state: RequestState | None, status: str) -> dict[str, Any]:
        return response_object(self.ctx, state, status=status)

    def _event(self, number: int, name: str, **fields: Any) -> str:
        data = dumps({"type": name, "sequence_number": number, **fields})
        return self.cursor.event(number, data, name=name)
