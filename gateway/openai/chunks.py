"""The chunk stream that chat completions and legacy completions share.

A stream renders what gateway/router.py's `Watch` emits for one SSE client: `token` for each
new token event, `done` once at the terminal state (the router's `Frames`). Positions (the
`<n>` of event ids `<request_id>:<n>`): 0 an opening chunk if the endpoint has one, the token
event of seq k at k, at last_seq + 1 the finish chunk or the error event, at last_seq + 2 the
usage chunk (`stream_options.include_usage`); `data: [DONE]` ends every stream and has no id.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from gateway.openai import sse
from gateway.openai.errors import terminal_error
from gateway.openai.protocol import StreamContext, dumps, usage
from llmstream.fold import RequestState


class ChunkStream(ABC):
    """Subclasses say how a choice looks (`_content_choice`, `_finish_choice`)."""

    object_name = ""

    def __init__(self, ctx: StreamContext, chunk_id: str, after: int = -1) -> None:
        self.ctx = ctx
        self.cursor = sse.Cursor(ctx.request_id, after)
        self._head: dict[str, Any] = {
            "id": chunk_id,
            "object": self.object_name,
            "created": ctx.created,
            "model": ctx.model,
        }
        # Chunks are built as text around the choice (the hot path: one per token event and
        # client); the same JSON as `dumps` of the whole object, as a test checks.
        self._prefix = dumps(self._head)[:-1] + ',"choices":['
        # With include_usage, OpenAI sends `"usage": null` on every chunk but the last.
        self._suffix = '],"usage":null}' if ctx.include_usage else "]}"
        self._opened = False

    @property
    def token_after_seq(self) -> int:
        """Token events the client still needs: those with a seq above this."""
        return max(0, self.cursor.after)

    def opening(self) -> str:
        """What a stream sends before its first token (send it at once: the client sees the
        stream start before the model's first token)."""
        if self._opened:
            return ""
        self._opened = True
        return self._opening()

    def _opening(self) -> str:
        return ""

    def token(self, request_id: str, seq: int, text: str) -> str:
        out = self.opening()
        if text:  # an event may carry token ids whose text is held back (split UTF-8)
            out += self.cursor.event(seq, self._prefix + self._content_choice(text) + self._suffix)
        return out

    def done(self, state: RequestState) -> str:
        out = self.opening()
        end = state.last_seq + 1
        err = terminal_error(state)
        if err is not None:
            out += self.cursor.event(end, err.json())
        else:
            finish = self._finish_choice(state.finish_reason)
            out += self.cursor.event(end, self._prefix + finish + self._suffix)
            if self.ctx.include_usage:
                last = dumps({**self._head, "choices": [], "usage": usage(state)})
                out += self.cursor.event(end + 1, last)
        return out + sse.DONE

    @abstractmethod
    def _content_choice(self, text: str) -> str:
        """The `choices` JSON of a chunk carrying `text` (the endpoint's shape)."""

    @abstractmethod
    def _finish_choice(self, finish_reason: str) -> str:
        """The `choices` JSON of the chunk that ends the stream."""
