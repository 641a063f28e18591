"""SSE framing as the official SDK's decoder reads it; Last-Event-ID parsing."""

from __future__ import annotations

import pytest
from openai._streaming import SSEDecoder

from gateway.openai import sse
from gateway.openai.errors import OpenAIError


def decode(text: str) -> list[tuple[str | None, str | None, str]]:
    return [(e.event, e.id, e.data) for e in SSEDecoder().iter_bytes(iter([text.encode()]))]


def test_events_with_names_ids_and_several_lines() -> None:
    text = (
        sse.event('{"a":1}', event_id="req_1:0")
        + sse.event("two\nlines\r\nand\rthree", event_id="req_1:1", name="message")
        + sse.DONE
    )
    assert text.startswith('id: req_1:0\ndata: {"a":1}\n\n')
    assert decode(text) == [
        (None, "req_1:0", '{"a":1}'),
        ("message", "req_1:1", "two\nlines\nand\nthree"),
        (None, "req_1:1", "[DONE]"),  # the last id sticks, as the spec says
    ]


def test_heartbeats_between_events_are_invisible_to_the_sdk() -> None:
    """A blank line after a comment would make the SDK's decoder dispatch an empty event once
    an id was seen (and the SDK then fails to parse it as JSON)."""
    text = (
        sse.HEARTBEAT
        + sse.event("1", event_id="r:1")
        + sse.HEARTBEAT
        + sse.HEARTBEAT
        + sse.event("2", event_id="r:2")
        + sse.HEARTBEAT
        + sse.DONE
    )
    assert [data for _, _, data in decode(text)] == ["1", "2", "[DONE]"]
    assert decode(": keep-alive\n\n" + sse.event("1", event_id="r:1") + ": keep-alive\n\n")[-1] == (
        None, "r:1", "",
    )  # fmt: skip  # what a comment with its blank line would do


def test_last_event_id_names_a_position_of_this_stream() -> None:
    assert sse.last_event_position(None, "req_1") == -1
    assert sse.last_event_position("req_1:0", "req_1") == 0
    assert sse.last_event_position(" req_1:42 ", "req_1") == 42
    assert sse.last_event_position("a:b:7", "a:b") == 7  # the position is after the last colon
    for header, message in (
        ("req_2:3", "another request"),
        ("req_1", "event id of this stream"),
        ("req_1:-1", "event id of this stream"),
        ("req_1:x", "event id of this stream"),
        (":3", "event id of this stream"),
    ):
        with pytest.raises(OpenAIError, match=message) as err:
            sse.last_event_position(header, "req_1")
        assert (err.value.status, err.value.param) == (400, "Last-Event-ID")


def test_a_cursor_skips_what_the_client_has() -> None:
    cursor = sse.Cursor("req_1", after=3)
    assert cursor.event(3, "x") == ""
    assert cursor.event(4, "y", name="e") == "event: e\nid: req_1:4\ndata: y\n\n"
