"""`/v1/chat/completions`: token events -> `chat.completion.chunk` events exactly as OpenAI
streams them (the role in the first delta, content deltas, a finish chunk, the usage chunk when
asked, `[DONE]`), and a request's final state -> a `chat.completion` body."""

from __future__ import annotations

from json.encoder import encode_basestring as json_str  # JSON string literal, non-ASCII kept
from typing import Any

from gateway.openai.chunks import ChunkStream
from gateway.openai.errors import terminal_error
from gateway.openai.protocol import StreamContext, usage
from llmstream.fold import RequestState


def chat_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


class ChatCompletionStream(ChunkStream):
    """Position 0 is the role chunk; see gateway/openai/chunks.py for the others."""

    object_name = "chat.completion.chunk"

    def __init__(self, ctx: StreamContext, after: int = -1) -> None:
        super().__init__(ctx, chat_id(ctx.request_id), after)

    def _opening(self) -> str:
        role = '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
        return self.cursor.event(0, self._prefix + role + self._suffix)

    def _content_choice(self, text: str) -> str:
        return f'{{"index":0,"delta":{{"content":{json_str(text)}}},"logprobs":null,"finish_reason":null}}'

    def _finish_choice(self, finish_reason: str) -> str:
        return (
            f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":{json_str(finish_reason)}}}'
        )


def chat_completion(ctx: StreamContext, state: RequestState) -> dict[str, Any]:
    """The body of a non-streaming chat completion from the request's terminal state; raises
    the `OpenAIError` to answer with when the generation ended without an answer."""
    err = terminal_error(state)
    if err is not None:
        raise err
    message: dict[str, Any] = {
        "role": "assistant",
        "content": state.text,
        "refusal": None,
        "annotations": [],
    }
    return {
        "id": chat_id(ctx.request_id),
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": state.finish_reason,
            }
        ],
        "usage": usage(state),
    }
