"""A client session as a careful application would write one: it submits requests on one
WebSocket, each with an idempotency key, and, when the socket closes (its gateway replica
died, or closed it as a slow consumer), reconnects to the next replica, submits again what was
never answered (the key makes that safe) and resumes every unfinished request after the last
contiguous seq it holds. Every frame is recorded with its arrival time, duplicates included,
so `check` can judge what the user would have seen. `stall()` stops reading for a while (a
network stall: the gateway's writes back up into its send buffer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from llmstream_tools.chaos.check import ClientStream

log = logging.getLogger("llmstream_tools.chaos")

RECONNECT_WITHIN_S = 60.0
# Error codes after which the gateway has dropped the request's watch: resume again.
_RETRY_CODES = ("internal", "overloaded")
# The client_ref of a resume frame: an error answering it names the request through it.
_RESUME_REF = "resume/"


class Session:
    def __init__(self, ports: Sequence[int], home: int, key: str, name: str) -> None:
        self.ports = list(ports)
        self.current = home % len(self.ports)
        self.key = key
        self.name = name
        self.streams: dict[str, ClientStream] = {}
        self.refused: dict[str, dict[str, Any]] = {}  # client_ref -> its error frame
        self.accepted: dict[str, str] = {}  # client_ref -> request id
        self.stray_errors: list[dict[str, Any]] = []  # error frames of nothing this session had
        self.reconnects = 0
        self.reconnected_at: list[float] = []  # monotonic: a new socket said hello
        self.close_codes: list[int | None] = []
        # Unanswered submits: client_ref -> (prompt, submitted at, frame to send again).
        self._refs: dict[str, tuple[str, float, str]] = {}
        self._socket = 0  # incremented per connection: errors of an old socket are stale
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._retries: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    @property
    def port(self) -> int:
        return self.ports[self.current]

    async def _connect(self, port: int) -> ClientConnection:
        ws = await connect(
            f"ws://127.0.0.1:{port}/ws",
            additional_headers={"Authorization": f"Bearer {self.key}"},
            compression=None,
            max_size=None,
            open_timeout=10,
            # Like a browser: no client pings. A stalled client must look stalled to the
            # gateway, not be closed by its own keepalive.
            ping_interval=None,
            max_queue=16,
        )
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected hello, got {hello}")
        return ws

    async def start(self) -> None:
        self._ws = await self._connect(self.port)
        self._socket += 1
        self._reader = asyncio.create_task(self._run())

    async def submit(
        self, ref: str, prompt: str, max_tokens: int, temperature: float = 0.0
    ) -> None:
        """Send a submit; on a socket that is closing it is sent again after the reconnect.
        Temperature 0 is greedy: the text is known in advance."""
        assert self._ws is not None
        frame = json.dumps(
            {
                "type": "submit",
                "client_ref": ref,
                "model": "synthetic",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "idempotency_key": f"{self.name}/{ref}",
            }
        )
        self._refs[ref] = (prompt, time.monotonic(), frame)
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(frame)

    def unanswered(self) -> int:
        """Submits with neither `accepted` nor `error` yet."""
        return len(self._refs)

    def unfinished(self) -> list[ClientStream]:
        return [s for s in self.streams.values() if not s.dones]

    async def wait(self, cond: Any, within_s: float) -> bool:
        end = time.monotonic() + within_s
        while not cond():
            if self.failure is not None:
                raise self.failure
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return True

    async def stall(self, seconds: float) -> None:
        """Stop reading for `seconds` (the socket stays open; nothing is received)."""
        self._reading.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._reading.set()

    async def close(self) -> None:
        self._closing = True
        self._reading.set()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 5)
        for task in [self._reader, *self._retries]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # ---- reading --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._closing:
                ws = self._ws
                assert ws is not None
                try:
                    while True:
                        await self._reading.wait()
                        raw = await ws.recv()
                        self._on_frame(json.loads(raw), time.monotonic())
                except ConnectionClosed:
                    if self._closing:
                        return
                    self.close_codes.append(ws.close_code)
                await self._reconnect()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by wait(): the phase cannot go on
            self.failure = exc
            self._changed.set()

    async def _reconnect(self) -> None:
        """The next replica (round robin) that accepts a socket, then resume everything open."""
        self.reconnects += 1
        deadline = time.monotonic() + RECONNECT_WITHIN_S
        index = self.current
        while True:
            index = (index + 1) % len(self.ports)
            try:
                ws = await self._connect(self.ports[index])
                break
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no gateway accepts a socket") from exc
                await asyncio.sleep(0.2)
        self._ws, self.current = ws, index
        self._socket += 1
        self.reconnected_at.append(time.monotonic())
        log.info("session reconnected", extra={"fields": {"session": self.name, "port": self.port}})
        for _, _, frame in list(self._refs.values()):
            with contextlib.suppress(ConnectionClosed):  # the reader reconnects again
                await ws.send(frame)
        for stream in self.unfinished():
            await self._resume(stream)

    async def _resume(self, stream: ClientStream) -> None:
        assert self._ws is not None
        frame = {
            "type": "resume",
            "request_id": stream.request_id,
            "after_seq": stream.contiguous_seq(),
            "client_ref": _RESUME_REF + stream.request_id,
        }
        with contextlib.suppress(ConnectionClosed):  # the reader reconnects and resumes again
            await self._ws.send(json.dumps(frame))

    async def _resume_later(self, stream: ClientStream, socket: int, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if socket == self._socket and not stream.dones and not self._closing:
            await self._resume(stream)

    def _on_frame(self, f: dict[str, Any], at: float) -> None:
        kind = f.get("type")
        rid = str(f.get("request_id", ""))
        if kind == "accepted":
            ref = str(f.get("client_ref", ""))
            prompt, submitted, _ = self._refs.pop(ref, ("", at, ""))
            self.accepted.setdefault(ref, rid)
            self.streams.setdefault(rid, ClientStream(rid, prompt, submitted))
        elif kind == "token":
            self._stream(rid, at).tokens.append((at, int(f["seq"]), f["text"]))
        elif kind == "done":
            self._stream(rid, at).dones.append((at, f))
        elif kind == "error":
            ref = str(f.get("client_ref", ""))
            if ref.startswith(_RESUME_REF):
                rid = ref.removeprefix(_RESUME_REF)
            if ref in self._refs:
                del self._refs[ref]
                self.refused[ref] = f
            elif rid in self.streams:
                stream = self.streams[rid]
                stream.errors.append(f)
                if f.get("code") in _RETRY_CODES and not stream.dones:
                    delay = int(f.get("retry_after_ms") or 500) / 1000
                    task = asyncio.ensure_future(self._resume_later(stream, self._socket, delay))
                    self._retries.add(task)
                    task.add_done_callback(self._retries.discard)
            else:
                self.stray_errors.append(f)
        self._changed.set()

    def _stream(self, rid: str, at: float) -> ClientStream:
        stream = self.streams.get(rid)
        if stream is None:  # a frame for a request this session never had accepted
            stream = self.streams[rid] = ClientStream(rid, "", at)
        return stream
