"""Server-Sent Events framing with resumable event ids.

Every event of a request's stream carries `id: <request_id>:<position>`. Positions grow along
the stream and are computed from the request's token seqs (each serving module defines them),
so they are the same on every replica: a client that reconnects anywhere with `Last-Event-ID`
gets exactly the events after that position, with no gap and no duplicate. Frames are `str`
(the gateway's send queues hold text); the transport encodes them as UTF-8.
"""

from __future__ import annotations

import re

from gateway.openai.errors import invalid_value
from gateway.openai.protocol import MAX_POSITION

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx and its kin buffer responses unless told not to: tokens would arrive in bursts.
    "X-Accel-Buffering": "no",
}
DONE = "data: [DONE]\n\n"
# A comment line *without* the blank line that would end an event. With one, SSE decoders that
# keep the last event id (the official Python SDK's, per the SSE spec) dispatch an event with
# empty data after any event that had an id, and the SDK fails parsing it as JSON. Comment
# lines alone are ignored by every decoder and still move bytes through idle proxies.
HEARTBEAT = ": keep-alive\n"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def event(data: str, *, event_id: str | None = None, name: str | None = None) -> str:
    """One event; `data` may span lines (each becomes a `data:` line, as the spec says)."""
    head = ""
    if name is not None:
        head += f"event: {name}\n"
    if event_id is not None:
        head += f"id: {event_id}\n"
    body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return head + body + "\n"


def event_id(request_id: str, position: int) -> str:
    return f"{request_id}:{position}"


def last_event_position(header: str | None, request_id: str) -> int:
    """The position a `Last-Event-ID` header names in `request_id`'s stream (-1: no header, the
    whole stream). An id of another request, or one that is not ours, is a 400."""
    if header is None:
        return -1
    rid, _, position = header.strip().rpartition(":")
    if not position.isdigit() or not rid or int(position) > MAX_POSITION:
        raise invalid_value(
            "Last-Event-ID", "must be an event id of this stream (<request id>:<n>)"
        )
    if rid != request_id:
        raise invalid_value("Last-Event-ID", "is an event id of another request")
    return int(position)


class Cursor:
    """The positions of one stream and how many of them the client already has: events at or
    below `after` are not sent again."""

    def __init__(self, request_id: str, after: int = -1) -> None:
        self.request_id = request_id
        self.after = after

    def event(self, position: int, data: str, name: str | None = None) -> str:
        """The framed event, or "" when the client has it."""
        if position <= self.after:
            return ""
        return event(data, event_id=event_id(self.request_id, position), name=name)
