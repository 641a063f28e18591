"""`/v1/completions` (legacy text completions): token events -> `text_completion` chunks as
OpenAI streams them (text deltas, a finish chunk, the usage chunk when asked, `[DONE]`), and a
request's final state -> a `text_completion` body."""

from __future__ import annotations

from json.encoder import encode_basestring as json_str  # JSON string literal, non-ASCII kept
from typing import Any

from gateway.openai.chunks import ChunkStream
from gateway.openai.errors import terminal_error
from gateway.openai.protocol import StreamContext, usage
from llmstream.fold import RequestState


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


class CompletionStream(ChunkStream):
    """No opening chunk: the first event is the first text (gateway/openai/chunks.py)."""

    object_name = "text_completion"

    def __init__(self, ctx: StreamContext, after: int = -1) -> None:
        super().__init__(ctx, completion_id(ctx.request_id), after)

    def _content_choice(self, text: str) -> str:
        return f'{{"text":{json_str(text)},"index":0,"logprobs":null,"finish_reason":null}}'

    def _finish_choice(self, finish_reason: str) -> str:
        return f'{{"text":"","index":0,"logprobs":null,"finish_reason":{json_str(finish_reason)}}}'


def completion(ctx: StreamContext, state: RequestState) -> dict[str, Any]:
    """The body of a non-streaming completion from the request's terminal state; raises the
    `OpenAIError` to answer with when the generation ended without an answer."""
    err = terminal_error(state)
    if err is not None:
        raise err
    return {
        "id": completion_id(ctx.request_id),
        "object": "text_completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [
            {
                "text": state.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": state.finish_reason,
            }
        ],
        "usage": usage(state),
    }
