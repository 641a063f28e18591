"""Incremental UTF-8 detokenization and stop strings (pure, no engine)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from model_server.utf8 import IncrementalDetokenizer, StopMatcher


def byte_piece(token_id: int) -> bytes:
    return bytes((token_id,))


def test_multibyte_character_is_held_back_until_complete() -> None:
    d = IncrementalDetokenizer(byte_piece)
    euro = "€".encode()  # 3 bytes
    assert d.push(euro[0]) == ""
    assert d.pending == euro[:1]
    assert d.push(euro[1]) == ""
    assert d.push(euro[2]) == "€"
    assert d.pending == b""


def test_invalid_bytes_become_replacement_characters() -> None:
    d = IncrementalDetokenizer(byte_piece)
    assert d.push(0xFF) == "\ufffd"
    assert d.push(0xC3) == ""
    assert d.push(ord("a")) == "\ufffda"  # a lead byte followed by ASCII can never complete


def test_priming_reproduces_the_uninterrupted_state() -> None:
    data = "a😀b".encode()
    ids = list(data)
    for k in range(len(ids) + 1):
        whole = IncrementalDetokenizer(byte_piece)
        head = "".join(whole.push(t) for t in ids[:k])
        tail_ref = "".join(whole.push(t) for t in ids[k:])
        resumed = IncrementalDetokenizer(byte_piece, prime=ids[:k])
        assert "".join(resumed.push(t) for t in ids[k:]) == tail_ref
        assert head + tail_ref == "a😀b"


@given(st.text(max_size=40), st.lists(st.integers(1, 4), max_size=40))
def test_any_split_of_valid_utf8_yields_the_text(text: str, sizes: list[int]) -> None:
    data = text.encode()
    pieces: list[bytes] = []
    i = 0
    for n in sizes:
        if i >= len(data):
            break
        pieces.append(data[i : i + n])
        i += n
    if i < len(data):
        pieces.append(data[i:])
    d = IncrementalDetokenizer(lambda t: pieces[t])
    out = [d.push(t) for t in range(len(pieces))]
    assert "".join(out) == text
    for chunk in out:
        chunk.encode("utf-8")  # each delta is valid on its own


def test_stop_string_split_across_pushes_is_never_emitted() -> None:
    m = StopMatcher(["END"])
    assert m.push("hello E") == "hello "
    assert m.held == "E"
    assert m.push("N") == ""
    assert m.push("D and more") == ""
    assert m.stopped


def test_false_start_of_a_stop_string_is_released() -> None:
    m = StopMatcher(["END"])
    assert m.push("EN") == ""
    assert m.push("x") == "ENx"
    assert not m.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.push("hello world") == "hel"
    assert m.stopped


def test_stop_matcher_priming_holds_back_like_the_original() -> None:
    text = "abc ST"
    stops = ["STOP"]
    ref = StopMatcher(stops)
    emitted = ref.push(text)
    primed = StopMatcher(stops, prime=text)
    assert primed.held == ref.held == "ST"
    assert emitted == "abc "
    assert primed.push("OP") == "" and primed.stopped
    done = StopMatcher(stops, prime="xx STOP yy")
    assert done.stopped


@given(st.text(alphabet="abS TOP", max_size=30), st.lists(st.integers(1, 5), max_size=30))
def test_stop_matcher_is_split_invariant(text: str, sizes: list[int]) -> None:
    stops = ["STOP", "aa"]
    expected = text
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        expected = text[:cut]
    m = StopMatcher(stops)
    out = []
    i = 0
    for n in [*sizes, len(text)]:
        out.append(m.push(text[i : i + n]))
        i += n
        if i >= len(text):
            break
    emitted = "".join(out)
    if cut >= 0:
        assert m.stopped and emitted == expected
    else:
        assert expected.startswith(emitted) and emitted + m.held == expected
