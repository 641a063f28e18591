"""Abuse of the WebSocket protocol (docs/protocol.md), fuzzed with Hypothesis against a real
gateway (in process; real Kafka, Redis and PostgreSQL; the fake worker streams): well over
1,000 generated frames of wrong types, missing fields, huge strings, deep JSON, binary frames,
invalid UTF-8, lone surrogates, NaN, unknown versions and fields, fragmented messages.

Every frame gets, in order, the answer the protocol prescribes (`invalid_request` naming the
field, `not_found`, `pong`, `accepted`), or the close the WebSocket RFC requires (invalid UTF-8
in a text frame: 1007; a message over the size limit: 1009). No `internal` error, no traceback
in a frame or a log line, every server frame is strict JSON, and a bystander socket of another
tenant keeps streaming exactly.

Hypothesis runs derandomized (the same frames on every run, in CI too); a failing example is
printed shrunk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway import protocol
from gateway.server import Gateway
from llmstream_tools import admin
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import FakeWorker, Topics

pytestmark = pytest.mark.integration

T = TypeVar("T")

MAX_FRAME = 65536  # LLMSTREAM_GATEWAY_MAX_FRAME_BYTES (default)
MAX_MESSAGE = 2 * MAX_FRAME  # the WebSocket message limit (above: 1009)
EXAMPLES = 250
CODES = {
    protocol.UNAUTHORIZED,
    protocol.INVALID_REQUEST,
    protocol.QUOTA_EXCEEDED,
    protocol.OVERLOADED,
    protocol.NOT_FOUND,
}


def strict_loads(raw: str | bytes) -> Any:
    """json.loads that refuses NaN/Infinity: what a browser's JSON.parse accepts."""

    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(raw, parse_constant=refuse)


# ---- frames and what each must be answered with ------------------------------------------


class Frame:
    """One client message and the answer it must get: ("invalid", field) | ("pong", data) |
    ("pong_or_invalid",) | ("not_found",) | ("accepted",) | ("any",)."""

    def __init__(self, data: str | bytes | tuple[str, ...], expect: tuple[Any, ...]) -> None:
        self.data = data  # a tuple: one text message sent in fragments
        self.expect = expect

    def __repr__(self) -> str:  # failing examples stay readable
        shown = repr(self.data)
        if len(shown) > 300:
            shown = f"{shown[:200]}... ({len(self.data)} long)"
        return f"Frame({shown}, {self.expect})"


class Closing:
    """A message after which the WebSocket layer must close the socket with `code`."""

    def __init__(self, data: bytes, code: int) -> None:
        self.data = data
        self.code = code

    def __repr__(self) -> str:
        return f"Closing({self.data[:60]!r}, {len(self.data)} bytes, {self.code})"


def dump(obj: Any) -> str:
    return json.dumps(obj)  # ensure_ascii: lone surrogates travel as \\udXXX escapes


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
not_none = json_values.filter(lambda v: v is not None)
not_str = json_values.filter(lambda v: v is not None and not isinstance(v, str))
not_int = json_values.filter(
    lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int))
)
not_number = json_values.filter(
    lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int | float))
)
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
# A lone surrogate somewhere in otherwise normal text: valid JSON (`\\ud800`), invalid Unicode.
with_surrogate = st.tuples(st.text(max_size=10), surrogates, st.text(max_size=10)).map("".join)
long_ids = st.integers(129, 400).map(lambda n: "i" * n)
request_ids = st.text(min_size=1, max_size=128)
roles = st.sampled_from(["system", "user", "assistant"])
# Unknown fields (later protocol versions may add fields; this one must ignore them).
future_fields = st.dictionaries(
    st.sampled_from(["protocol", "version", "v", "x_future", "trace", "priority"]),
    st.sampled_from(["llmstream.v1", "llmstream.v2", "llmstream.v99", 2, 99, None]) | json_values,
    max_size=3,
)


@st.composite
def valid_submits(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": "submit", "model": "synthetic"}
    obj["max_tokens"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        obj["prompt"] = draw(st.text(min_size=1, max_size=200))
    else:
        message = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=40)})
        obj["messages"] = draw(st.lists(message, min_size=1, max_size=4))
    optional = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.text(min_size=1, max_size=64)
        | st.lists(st.text(min_size=1, max_size=64), max_size=8),
        "client_ref": st.text(max_size=128),
        # A few keys only: repeats are idempotent resubmits (`accepted` with `existing`).
        "idempotency_key": st.sampled_from(["k1", "k2", "k3"]),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            obj[name] = draw(strategy)
    obj.update(draw(future_fields))
    return obj


@st.composite
def invalid_submits(draw: st.DrawFn) -> Frame:
    """A valid submit with exactly one thing wrong: the error must name that field."""
    obj = draw(valid_submits())
    obj.pop("client_ref", None)
    kind = draw(
        st.sampled_from(
            [
                "model", "max_tokens", "prompt", "both", "neither", "messages", "message",
                "role", "content", "stop", "temperature", "top_p", "seed", "idempotency_key",
                "client_ref", "surrogate",
            ]
        )
    )  # fmt: skip
    fld = kind
    if kind == "model":
        obj["model"] = draw(st.none() | not_str | st.just("") | long_ids)
    elif kind == "max_tokens":
        obj["max_tokens"] = draw(
            st.none() | not_int | st.integers(max_value=0) | st.integers(min_value=1_000_001)
        )
    elif kind in ("prompt", "both", "neither"):
        fld = "prompt"
        obj.pop("messages", None)
        if kind == "prompt":
            obj["prompt"] = draw(
                not_str | st.just("") | st.integers(32_001, 40_000).map(lambda n: "p" * n)
            )
        elif kind == "both":
            obj["prompt"] = "x"
            obj["messages"] = [{"role": "user", "content": "y"}]
        else:
            obj.pop("prompt", None)
    elif kind == "messages":
        obj.pop("prompt", None)
        obj["messages"] = draw(
            not_none.filter(lambda v: not isinstance(v, list))
            | st.just([])
            | st.just([{"role": "user", "content": "m"}] * 65)
            | st.just([{"role": "user", "content": "c" * 33_000}])
        )
    if kind in ("message", "role", "content"):
        obj.pop("prompt", None)
        good = draw(
            st.lists(
                st.fixed_dictionaries({"role": roles, "content": st.text(max_size=9)}), max_size=3
            )
        )
        i = len(good)
        fld = f"messages[{i}]"
        if kind == "message":
            bad: Any = draw(not_none.filter(lambda v: not isinstance(v, dict)))
        elif kind == "role":
            fld += ".role"
            role = draw(
                json_values.filter(lambda v: v not in ("system", "user", "assistant"))
                | st.sampled_from(["System", "tool", "", "user "])
            )
            bad = {"role": role, "content": "c"}
        else:
            fld += ".content"
            bad = {"role": "user", "content": draw(st.none() | not_str | with_surrogate)}
        obj["messages"] = [*good, bad]
    elif kind == "stop":
        obj["stop"] = draw(
            st.none()
            | not_str.filter(lambda v: not isinstance(v, list))
            | st.just(["s"] * 9)
            | st.just([""])
            | st.just(["s" * 65])
            | not_str.map(lambda v: ["ok", v])
        )
    elif kind == "temperature":
        obj["temperature"] = draw(not_number | st.floats(-1e300, -0.001) | st.floats(2.001, 1e300))
    elif kind == "top_p":
        obj["top_p"] = draw(not_number | st.floats(-1e300, 0.0) | st.floats(1.0001, 1e300))
    elif kind == "seed":
        obj["seed"] = draw(not_int | st.integers(max_value=-1) | st.integers(min_value=2**63))
    elif kind == "idempotency_key":
        obj["idempotency_key"] = draw(not_str | st.just("") | long_ids)
    elif kind == "client_ref":
        obj["client_ref"] = draw(not_str | long_ids)
    elif kind == "surrogate":
        fld = draw(st.sampled_from(["model", "prompt", "idempotency_key", "client_ref", "stop"]))
        value = draw(with_surrogate)
        if fld == "prompt":
            obj.pop("messages", None)
        obj[fld] = [value] if fld == "stop" else value
    return Frame(dump(obj), ("invalid", fld))


@st.composite
def invalid_others(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(["cancel", "resume_id", "after_seq", "type", "unknown_type"]))
    extra = draw(future_fields)
    if kind == "cancel":
        obj = {"type": "cancel", "request_id": draw(st.none() | not_str | st.just("") | long_ids)}
        return Frame(dump({**extra, **obj}), ("invalid", "request_id"))
    if kind == "resume_id":
        obj = {"type": "resume", "request_id": draw(st.none() | not_str | st.just("") | long_ids)}
        return Frame(dump({**extra, **obj}), ("invalid", "request_id"))
    if kind == "after_seq":
        seq = draw(not_int | st.integers(max_value=-1) | st.integers(min_value=2**32))
        obj = {"type": "resume", "request_id": draw(request_ids), "after_seq": seq}
        return Frame(dump({**extra, **obj}), ("invalid", "after_seq"))
    if kind == "type":
        obj = {**extra, "type": draw(st.none() | not_str), "request_id": "r"}
        return Frame(dump(obj), ("invalid", "type"))
    unknown = draw(
        # `hello` is a client frame too since the `tokens` capability (unanswered).
        st.text(max_size=60).filter(
            lambda t: t not in ("submit", "cancel", "resume", "ping", "hello")
        )
        | st.sampled_from(["SUBMIT", "submit ", " ping", "Hello", "token", "done", "v2.submit"])
    )
    return Frame(dump({**extra, "type": unknown}), ("invalid", "type"))


def not_a_json_object(text: str) -> bool:
    try:
        return not isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return True


@st.composite
def malformed(draw: st.DrawFn) -> Frame:
    """Frames that are not a JSON object, or not JSON at all: field `frame`."""
    kind = draw(
        st.sampled_from(
            ["text", "scalar", "nan", "deep", "deep_object", "bom", "trailing", "huge", "wide"]
        )
    )
    if kind == "text":
        raw = draw(st.text(max_size=80).filter(not_a_json_object))
    elif kind == "scalar":
        raw = dump(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    elif kind == "nan":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        raw = (
            draw(
                st.sampled_from(
                    [
                        '{"type":"ping","data":%s}',
                        '{"type":"submit","model":"m","max_tokens":1,"prompt":"x","temperature":%s}',
                        '{"type":"ping","data":[1,{"a":%s}]}',
                        '{"type":"resume","request_id":"r","x":%s}',
                    ]
                )
            )
            % constant
        )
    elif kind == "deep":
        depth = draw(st.integers(2_000, 30_000))
        raw = "[" * depth + "]" * depth
    elif kind == "deep_object":  # the recursion limit is not fixed (Hypothesis raises it)
        depth = draw(st.integers(2_000, 20_000))
        raw = '{"type":"ping","data":' + '{"a":' * depth + "1" + "}" * depth + "}"
        return Frame(raw, ("pong_or_invalid",))
    elif kind == "bom":
        raw = "\ufeff" + dump({"type": "ping"})
    elif kind == "trailing":
        raw = dump({"type": "ping"}) + draw(st.sampled_from(["x", "}", "{}", ",", "\x00"]))
    elif kind == "huge":  # over LLMSTREAM_GATEWAY_MAX_FRAME_BYTES, under the message limit
        n = draw(st.integers(MAX_FRAME + 1, MAX_MESSAGE - 100))
        raw = dump({"type": "submit", "model": "m", "max_tokens": 1, "prompt": "h" * n})
    else:  # few characters, many bytes: the limit is in bytes
        n = draw(st.integers(MAX_FRAME // 3 + 1, MAX_FRAME // 2))
        raw = dump({"type": "ping", "data": "\u20ac" * n}).replace("\\u20ac", "\u20ac")
    return Frame(raw, ("invalid", "frame"))


binary_frames = (st.binary(max_size=200) | st.just(dump({"type": "ping"}).encode())).map(
    lambda b: Frame(b, ("invalid", "frame"))
)


@st.composite
def pings(draw: st.DrawFn) -> Frame:
    data = draw(json_values)
    obj: dict[str, Any] = {**draw(future_fields), "type": "ping"}
    if data is not None:
        obj["data"] = data
    raw = dump(obj)
    if draw(st.booleans()) and len(raw) > 1:  # the same message in fragments
        cuts = sorted(set(draw(st.lists(st.integers(1, len(raw) - 1), max_size=4))))
        bounds = [0, *cuts, len(raw)]
        return Frame(tuple(raw[a:b] for a, b in itertools.pairwise(bounds)), ("pong", data))
    return Frame(raw, ("pong", data))


@st.composite
def deep_pings(draw: st.DrawFn) -> Frame:
    """Nesting around the parser's recursion limit: a pong with the same data, or
    invalid_request; never a crash."""
    depth = draw(st.integers(850, 1_100))
    raw = '{"type":"ping","data":' + "[" * depth + "]" * depth + "}"
    return Frame(raw, ("pong_or_invalid",))


@st.composite
def unknown_targets(draw: st.DrawFn) -> Frame:
    obj: dict[str, Any] = {
        **draw(future_fields),
        "type": draw(st.sampled_from(["cancel", "resume"])),
        "request_id": draw(request_ids | st.just("req_" + "0" * 32)),
    }
    if obj["type"] == "resume" and draw(st.booleans()):
        obj["after_seq"] = draw(st.integers(0, 2**32 - 1))
    return Frame(dump(obj), ("not_found",))


@st.composite
def anything(draw: st.DrawFn) -> Frame:
    """Random objects: any well-formed answer (never `internal`)."""
    obj = draw(
        st.dictionaries(
            st.sampled_from(
                ["model", "max_tokens", "prompt", "messages", "stop", "temperature", "top_p",
                 "seed", "request_id", "after_seq", "data", "client_ref", "idempotency_key"]
            ),
            json_values.map(lambda v: v if not isinstance(v, int) or abs(v) > 2**40 else v % 5),
            max_size=6,
        )
    )  # fmt: skip
    obj["type"] = draw(st.sampled_from(["submit", "cancel", "resume", "ping"]) | json_values)
    return Frame(dump(obj), ("any",))


frames = st.one_of(
    invalid_submits(),
    invalid_others(),
    malformed(),
    binary_frames,
    pings(),
    deep_pings(),
    unknown_targets(),
    valid_submits().map(lambda o: Frame(dump(o), ("accepted",))),
    anything(),
)
closings = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.binary(min_size=1, max_size=50)
    .map(lambda b: b'{"type":"ping","data":"' + b + b'\xff"}')
    .map(lambda b: Closing(b, 1007)),
    st.just(Closing(b" " * (MAX_MESSAGE + 1), 1009)),
)


# ---- a real gateway on a loop in a thread (Hypothesis drives a synchronous test) --------------


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Socket:
    """A raw client: every server frame parsed strictly, in arrival order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.bad: list[str] = []  # frames that were not strict JSON objects
        self.changed = asyncio.Event()
        # How the connection ended, when it ended with an error close (wait() reports it).
        self.closed: ConnectionClosed | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    f = strict_loads(raw)
                    assert isinstance(f, dict)
                    self.frames.append(f)
                except (ValueError, AssertionError):
                    self.bad.append(repr(raw)[:300])
                self.changed.set()
        except ConnectionClosed as exc:
            self.closed = exc
        finally:
            self.changed.set()

    async def wait(self, cond: Any, within: float = 15.0) -> None:
        async with asyncio.timeout(within):
            while not cond():
                if self.reader.done():
                    raise AssertionError(f"socket closed ({self.ws.close_code}) while waiting")
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Harness:
    gw: Gateway
    port: int
    key: str
    bystander_key: str
    sock: Socket | None = None
    bystander: Socket | None = None
    sent: int = 0
    closes: dict[int, int] = field(default_factory=dict)
    bystander_refs: list[str] = field(default_factory=list)
    examples: int = 0

    async def connect(self, key: str) -> Socket:
        ws = await connect(
            f"ws://127.0.0.1:{self.port}/ws",
            additional_headers={"Authorization": f"Bearer {key}"},
            compression=None,
            max_size=None,
        )
        s = Socket(ws)
        await s.wait(lambda: bool(s.frames))
        assert s.frames[0]["type"] == "hello"
        return s

    async def example(self, batch: list[Frame], closing: Closing | None) -> None:
        if self.sock is None or self.sock.reader.done():
            self.sock = await self.connect(self.key)
        s = self.sock
        start = len(s.frames)
        for f in batch:
            if isinstance(f.data, tuple):
                await s.ws.send(iter(f.data))
            else:
                await s.ws.send(f.data)
        sentinel = {"sentinel": uuid.uuid4().hex}
        await s.ws.send(dump({"type": "ping", "data": sentinel}))
        await s.wait(lambda: any(x.get("data") == sentinel for x in s.frames[start:]))
        self.sent += len(batch)
        assert not s.bad, s.bad
        answers = [x for x in s.frames[start:] if x["type"] in ("error", "pong", "accepted")]
        assert answers[-1] == {"type": "pong", "data": sentinel}
        assert len(answers) - 1 == len(batch), (batch, answers)
        for f, answer in zip(batch, answers, strict=False):
            check(f, answer)
        if closing is not None:
            await s.ws.send(closing.data, text=True)
            async with asyncio.timeout(10):
                await asyncio.shield(s.reader)
            assert s.ws.close_code == closing.code, (closing, s.ws.close_code)
            self.closes[closing.code] = self.closes.get(closing.code, 0) + 1
            self.sock = None
        assert not s.reader.done() or closing is not None, "the gateway closed the socket"
        self.examples += 1
        if self.examples % 25 == 1:  # the bystander streams while the fuzz goes on
            assert self.bystander is not None
            ref = f"b{self.examples}"
            self.bystander_refs.append(ref)
            await self.bystander.ws.send(
                dump(
                    {
                        "type": "submit",
                        "client_ref": ref,
                        "model": "m",
                        "prompt": "p",
                        "max_tokens": 8,
                    }
                )
            )


def client_ref(f: Frame) -> str | None:
    """The frame's client_ref if it is a usable one (then every answer must echo it)."""
    if not isinstance(f.data, str):
        return None
    try:
        obj = json.loads(f.data)
        ref = obj.get("client_ref") if isinstance(obj, dict) else None
        if isinstance(ref, str) and len(ref) <= 128:
            ref.encode("utf-8")
            return ref
    except (ValueError, RecursionError):  # not JSON (or a lone surrogate): no client_ref
        return None
    return None


def check(f: Frame, answer: dict[str, Any]) -> None:
    where = f"{f!r} -> {answer}"
    ref = client_ref(f)
    if ref is not None and answer["type"] != "pong" and answer.get("field") != "frame":
        assert answer.get("client_ref") == ref, where
    if answer["type"] == "error":
        assert answer["code"] in CODES, where
        message = answer["message"]
        assert isinstance(message, str) and len(message) < 300, where
        assert "Traceback" not in message and 'File "' not in message, where
    kind = f.expect[0]
    if kind == "invalid":
        assert answer["type"] == "error" and answer["code"] == protocol.INVALID_REQUEST, where
        assert answer.get("field") == f.expect[1], where
    elif kind == "pong":
        expected = (
            {"type": "pong"} if f.expect[1] is None else {"type": "pong", "data": f.expect[1]}
        )
        assert answer == expected, where
    elif kind == "pong_or_invalid":
        assert answer["type"] == "pong" or answer.get("code") == protocol.INVALID_REQUEST, where
    elif kind == "not_found":
        assert answer["type"] == "error" and answer["code"] == protocol.NOT_FOUND, where
    elif kind == "accepted":
        ok = answer["type"] == "accepted" or answer.get("code") in (
            protocol.QUOTA_EXCEEDED,
            protocol.OVERLOADED,
        )
        assert ok, where


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("gateway", "websockets")):
            self.records.append(f"{record.name}: {record.getMessage()} {record.exc_info}")


@pytest.fixture
def harness(
    kafka_bootstrap: str, db_env: str, redis_url: str
) -> Iterator[tuple[Harness, LoopThread]]:
    lt = LoopThread()
    topics: Topics = lt.run(testing.create_topics(kafka_bootstrap, partitions=2))

    async def keys() -> tuple[str, str]:
        out = []
        for tier in ("enterprise", "standard"):
            name = f"t-{uuid.uuid4().hex[:8]}"
            await admin.create_tenant(name, tier)
            out.append((await admin.create_key(name)).key)
        return out[0], out[1]

    key, bystander_key = lt.run(keys())
    s = testing.settings(topics, redis_url, db_env, "gw-fuzz", [0, 1])
    gw = Gateway(s)

    async def start_worker() -> FakeWorker:
        return await FakeWorker(topics).__aenter__()  # aiokafka wants its loop running

    lt.run(gw.start())
    worker = lt.run(start_worker())
    h = Harness(gw, s.port, key, bystander_key)
    try:
        yield h, lt
    finally:
        for sock in (h.sock, h.bystander):
            if sock is not None:
                lt.run(sock.ws.close())
        lt.run(worker.__aexit__(None, None, None))
        lt.run(gw.stop())
        lt.run(testing.delete_topics(topics))
        lt.close()


# The gateway (aiokafka, redis) uses `random` on its loop thread while Hypothesis draws.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_fuzzed_frames_get_protocol_answers_and_bystander_streams(
    harness: tuple[Harness, LoopThread],
) -> None:
    h, lt = harness
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        h.bystander = lt.run(h.connect(h.bystander_key))

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            report_multiple_bugs=False,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(frames, min_size=4, max_size=16), closings)  # >= 1,000 frames
        def fuzz(batch: list[Frame], closing: Closing | None) -> None:
            lt.run(h.example(batch, closing))

        fuzz()
        b = h.bystander

        async def bystander_streams() -> None:
            assert b is not None

            def done() -> list[dict[str, Any]]:
                return [x for x in b.frames if x["type"] == "done"]

            await b.wait(lambda: len(done()) == len(h.bystander_refs), 30)
            accepted = {
                x["client_ref"]: x["request_id"] for x in b.frames if x["type"] == "accepted"
            }
            assert sorted(accepted) == sorted(h.bystander_refs)
            for rid in accepted.values():
                tokens = [
                    x for x in b.frames if x.get("request_id") == rid and x["type"] == "token"
                ]
                seqs, texts = [x["seq"] for x in tokens], [x["text"] for x in tokens]
                assert seqs == list(range(1, 9))
                assert texts == [testing.token_text(rid, q) for q in range(1, 9)]
            assert all(x["finish_reason"] == "length" for x in done())
            assert not b.bad and not b.reader.done()

        lt.run(bystander_streams())

        async def unknown_version_path() -> int:
            # A new protocol version is served on a new path; this gateway has none.
            with pytest.raises(InvalidStatus) as exc:
                await connect(
                    f"ws://127.0.0.1:{h.port}/v2/ws",
                    additional_headers={"Authorization": f"Bearer {h.key}"},
                )
            return exc.value.response.status_code

        assert lt.run(unknown_version_path()) == 404
    finally:
        logging.getLogger().removeHandler(errors)
    print(f"fuzz: {h.sent} frames in {h.examples} examples, closes {h.closes}")
    assert h.sent >= 1000
    assert h.closes.get(1007, 0) > 0 and h.closes.get(1009, 0) > 0
    assert errors.records == []
