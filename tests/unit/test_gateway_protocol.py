"""Gateway protocol v1: parsing, validation errors naming the field, server frames."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import protocol
from gateway.errors import GatewayError
from gateway.protocol import Cancel, Ping, ProtocolError, Resume, Submit, parse


def frame(**kw: Any) -> str:
    return json.dumps(kw)


def test_submit_prompt_and_messages() -> None:
    msg = parse(
        frame(
            type="submit",
            model="m",
            prompt="hi",
            max_tokens=5,
            temperature=0,
            top_p=0.9,
            seed=7,
            stop=["\n"],
            idempotency_key="k",
            client_ref="r1",
        )
    )
    assert msg == Submit(
        model="m",
        max_tokens=5,
        prompt="hi",
        temperature=0.0,
        top_p=0.9,
        seed=7,
        stop=("\n",),
        idempotency_key="k",
        client_ref="r1",
    )
    chat = parse(
        frame(type="submit", model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    )
    assert isinstance(chat, Submit) and chat.messages[0].content == "x" and chat.prompt is None
    assert parse(frame(type="cancel", request_id="r")) == Cancel("r")
    assert parse(frame(type="resume", request_id="r", after_seq=3)) == Resume("r", 3)
    assert parse(frame(type="resume", request_id="r")) == Resume("r", 0)
    assert parse(frame(type="ping", data=[1])) == Ping([1])


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("{", "frame"),
        ("null", "frame"),
        ('"submit"', "frame"),
        (frame(), "type"),
        (frame(type=3), "type"),
        (frame(type="nope"), "type"),
        (frame(type="submit", max_tokens=1, prompt="x"), "model"),
        (frame(type="submit", model="", max_tokens=1, prompt="x"), "model"),
        (frame(type="submit", model="m", prompt="x"), "max_tokens"),
        (frame(type="submit", model="m", max_tokens=True, prompt="x"), "max_tokens"),
        (frame(type="submit", model="m", max_tokens=0, prompt="x"), "max_tokens"),
        (frame(type="submit", model="m", max_tokens=1), "prompt"),
        (frame(type="submit", model="m", max_tokens=1, prompt="x", messages=[]), "prompt"),
        (frame(type="submit", model="m", max_tokens=1, prompt=5), "prompt"),
        (frame(type="submit", model="m", max_tokens=1, messages="x"), "messages"),
        (
            frame(type="submit", model="m", max_tokens=1, messages=[{"role": "x"}]),
            "messages[0].role",
        ),
        (
            frame(
                type="submit", model="m", max_tokens=1, messages=[{"role": "user", "content": 1}]
            ),
            "messages[0].content",
        ),
        (
            frame(type="submit", model="m", max_tokens=1, prompt="x", temperature="hot"),
            "temperature",
        ),
        (frame(type="submit", model="m", max_tokens=1, prompt="x", temperature=3), "temperature"),
        (frame(type="submit", model="m", max_tokens=1, prompt="x", top_p=0), "top_p"),
        (frame(type="submit", model="m", max_tokens=1, prompt="x", seed=-1), "seed"),
        (frame(type="submit", model="m", max_tokens=1, prompt="x", stop=[1]), "stop"),
        (
            frame(type="submit", model="m", max_tokens=1, prompt="x", idempotency_key=5),
            "idempotency_key",
        ),
        (frame(type="cancel"), "request_id"),
        (frame(type="resume", request_id="r", after_seq="1"), "after_seq"),
        (frame(type="ping", client_ref=5), "client_ref"),
        ("[" * 100_000, "frame"),
    ],
)
def test_invalid_frames_name_the_field(raw: str, field: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse(raw, max_bytes=1_000_000)
    err = json.loads(exc.value.frame())
    assert err["type"] == "error" and err["code"] == "invalid_request"
    assert err["field"] == field
    assert "Traceback" not in err["message"]


def test_binary_and_huge_frames() -> None:
    with pytest.raises(ProtocolError, match="binary"):
        parse(b"{}")
    with pytest.raises(ProtocolError, match="larger than 100 bytes"):
        parse(frame(type="ping", data="x" * 200), max_bytes=100)


def test_client_ref_is_echoed_in_errors() -> None:
    with pytest.raises(ProtocolError) as exc:
        parse(frame(type="submit", client_ref="abc", model="m", prompt="x"))
    assert json.loads(exc.value.frame())["client_ref"] == "abc"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_token_text_survives_any_content(text: str) -> None:
    out = json.loads(protocol.token("r", 1, text))
    expected = protocol.clean_text(text)
    assert out["text"] == expected
    expected.encode("utf-8")  # always encodable: a lone surrogate became U+FFFD
    if not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        assert expected == text


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(0, 2**40), st.text())
def test_token_frame_is_the_json_of_its_fields(request_id: str, seq: int, text: str) -> None:
    fields = {
        "type": "token",
        "request_id": request_id,
        "seq": seq,
        "text": protocol.clean_text(text),
    }
    assert protocol.token(request_id, seq, text) == protocol._dump(fields)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1"))))
def test_parse_never_raises_anything_but_protocol_error(raw: str) -> None:
    with contextlib.suppress(ProtocolError):
        parse(raw)


def test_server_frames() -> None:
    assert json.loads(protocol.accepted("r", "c", 5, capped="tier")) == {
        "type": "accepted",
        "request_id": "r",
        "client_ref": "c",
        "max_tokens": 5,
        "max_tokens_capped": "tier",
    }
    quota = GatewayError("quota_exceeded", "m", request_id="r", retry_after_ms=5)
    err = json.loads(protocol.error_frame(quota))
    assert err == {
        "type": "error",
        "code": "quota_exceeded",
        "message": "m",
        "request_id": "r",
        "retry_after_ms": 5,
    }
    assert json.loads(protocol.pong()) == {"type": "pong"}


def test_client_hello_takes_known_capabilities_only() -> None:
    msg = protocol.parse('{"type":"hello","capabilities":["tokens","future"],"client_ref":"h"}')
    assert msg == protocol.Hello(frozenset({"tokens"}), "h")
    assert protocol.parse('{"type":"hello"}') == protocol.Hello()
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse('{"type":"hello","capabilities":"tokens"}')
    assert exc.value.field == "capabilities"


def test_server_hello_offers_tokens_and_tokens_frame_shape() -> None:
    assert json.loads(protocol.hello("gw", 15000, "t"))["capabilities"] == ["tokens"]
    frame = json.loads(protocol.tokens("r", 9, ["a", '"b"\n', "\U0001f600"]))
    assert frame == {
        "type": "tokens",
        "request_id": "r",
        "seq": 9,
        "texts": ["a", '"b"\n', "\U0001f600"],
    }
