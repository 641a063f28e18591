"""Events made safe for PostgreSQL text: NUL (U+0000) becomes U+FFFD.

PostgreSQL `text` and `jsonb` cannot hold NUL. A string with one in an event — a model may
emit it, a client may put it in a model name, garbage on a topic may carry it — would fail its
batch on every retry and stall the projection (and so billing) for everyone. `decode` is
`codec.decode_record` plus that replacement; it only walks the event when the record's bytes contain a
zero byte (a NUL in a string always does; token deltas almost never do), so it costs nothing
on the hot path.
"""

from __future__ import annotations

from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from llmstream import codec
from llmstream.v1 import events_pb2

NUL = "\x00"
REPLACEMENT = "\ufffd"


def decode(record: codec.Record) -> events_pb2.Event:
    """`codec.decode_record(record)` with NULs in strings replaced (raises
    `codec.DecodeError`)."""
    event = codec.decode_record(record)
    value = record.value
    if value is not None and b"\x00" in value:
        scrub(event)
    return event


@cache
def _has_strings(descriptor: Descriptor, depth: int = 0) -> bool:
    if depth > 16:
        return False
    return any(
        f.type == FieldDescriptor.TYPE_STRING
        or (f.type == FieldDescriptor.TYPE_MESSAGE and _has_strings(f.message_type, depth + 1))
        for f in descriptor.fields
    )


@cache
def _plan(descriptor: Descriptor) -> tuple[tuple[str, ...], ...]:
    """(singular strings, repeated strings, singular messages, repeated messages) to visit."""
    strings: list[str] = []
    rep_strings: list[str] = []
    messages: list[str] = []
    rep_messages: list[str] = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            (rep_strings if f.is_repeated else strings).append(f.name)
        elif f.type == FieldDescriptor.TYPE_MESSAGE and _has_strings(f.message_type):
            (rep_messages if f.is_repeated else messages).append(f.name)
    return tuple(strings), tuple(rep_strings), tuple(messages), tuple(rep_messages)


def scrub(message: Message) -> None:
    """Replace NUL in every string field of `message`, recursively, in place."""
    strings, rep_strings, messages, rep_messages = _plan(message.DESCRIPTOR)
    for name in strings:
        value = getattr(message, name)
        if NUL in value:
            setattr(message, name, value.replace(NUL, REPLACEMENT))
    for name in rep_strings:
        values = getattr(message, name)
        if any(NUL in v for v in values):
            values[:] = [v.replace(NUL, REPLACEMENT) for v in values]
    for name in messages:
        if message.HasField(name):
            scrub(getattr(message, name))
    for name in rep_messages:
        for item in getattr(message, name):
            scrub(item)
