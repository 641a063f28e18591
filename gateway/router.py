"""Routing of token events to sockets (no I/O).

- `Outbox`: a socket's bounded send queue. `put` refuses (and marks the socket overflowed)
  when the socket is `limit` frames behind; the shell then closes it with code 4008, so a
  stalled reader never grows gateway memory beyond `limit` frames. A socket that opted in to
  `tokens` frames (docs/protocol.md, `batch_tokens`) queues a watch's tokens in one
  `TokenBatch` that grows while it waits (natural batching: whatever accumulated while the
  previous sends were in flight leaves as one frame); each batched token counts as a frame
  towards `limit`, so the memory bound is the same.
- `Watch`: one socket (or stream) following one request. It folds every event it sees with
  the one fold (llmstream/fold.py), so redelivered or replayed events are dropped by seq, and
  queues a token frame per new seq above `after_seq` and one done frame at the terminal event,
  rendered by its `Frames` (the WebSocket's by default; an HTTP/SSE front end brings its own).
  While a catch-up read from Kafka runs, live events are parked in `parked` and replayed
  after it (dedup by seq makes the overlap harmless: no gap, no duplicate).
- `Router`: request id -> watches (several sockets may watch one request).

A watch belongs to a tenant (the one that submitted or resumed it): an event of its request
that names another tenant is never applied (`Watch.accepts`). Request ids are not secrets, and
anything that can write the tokens topic could otherwise push text into another tenant's
stream; the router reports such an event (`on_foreign`: counted and logged by the feed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from gateway import protocol
from llmstream.fold import RequestState, fold
from llmstream.v1 import events_pb2


class Frames(Protocol):
    """How a front end renders what a watch emits."""

    def token(self, request_id: str, seq: int, text: str) -> str: ...

    def done(self, state: RequestState) -> str: ...


WEBSOCKET_FRAMES: Frames = protocol.Frames()


class TokenBatch:
    """Consecutive tokens of one watch waiting in an outbox as one entry; it takes more tokens
    until the sender takes it (`taken`), then renders as one frame."""

    __slots__ = ("last_seq", "request_id", "taken", "texts")

    def __init__(self, request_id: str, seq: int, text: str) -> None:
        self.request_id = request_id
        self.last_seq = seq
        self.texts = [text]
        self.taken = False

    def add(self, seq: int, text: str) -> None:
        self.last_seq = seq
        self.texts.append(text)

    def __len__(self) -> int:
        return len(self.texts)

    def render(self) -> str:
        if len(self.texts) == 1:  # a lone token keeps the v1 shape
            return protocol.token(self.request_id, self.last_seq, self.texts[0])
        return protocol.tokens(self.request_id, self.last_seq, self.texts)


class Outbox:
    def __init__(
        self,
        limit: int,
        wake: Callable[[], None] = lambda: None,
        on_overflow: Callable[[], None] = lambda: None,
    ) -> None:
        self.limit = limit
        self._on_overflow = on_overflow
        self.frames: deque[str | TokenBatch] = deque()
        # Frames waiting, a batch counting as many as it holds tokens (what `limit` bounds).
        self.queued = 0
        # The socket takes `tokens` frames: a watch's pending tokens leave as one frame.
        self.batch_tokens = False
        self.overflowed = False
        self.closed = False
        self.high_water = 0  # most frames ever queued (tests assert the bound)
        self._wake = wake

    def _room(self) -> bool:
        if self.closed or self.overflowed:
            return False
        if self.queued >= self.limit:
            self.overflow()
            return False
        self.queued += 1
        if self.queued > self.high_water:
            self.high_water = self.queued
        return True

    def put(self, frame: str) -> bool:
        if not self._room():
            return False
        self.frames.append(frame)
        self._wake()
        return True

    def put_token(
        self, batch: TokenBatch | None, request_id: str, seq: int, text: str
    ) -> TokenBatch | None:
        """Queue a token in `batch` if it still waits here, else in a new batch; returns the
        batch that holds it (None: refused, the socket is closed or overflowed)."""
        if not self._room():
            return None
        # Only the next seq joins: a frame's seqs are implied by its last one (a gap in the
        # log, counted by the fold, starts a new frame).
        if batch is not None and not batch.taken and seq == batch.last_seq + 1:
            batch.add(seq, text)
            return batch  # its entry is queued already, the sender is awake
        batch = TokenBatch(request_id, seq, text)
        self.frames.append(batch)
        self._wake()
        return batch

    def take(self) -> str:
        """The next frame to send (the outbox must not be empty)."""
        entry = self.frames.popleft()
        if isinstance(entry, str):
            self.queued -= 1
            return entry
        entry.taken = True
        self.queued -= len(entry)
        return entry.render()

    def clear(self) -> None:
        self.frames.clear()
        self.queued = 0

    def overflow(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        self.clear()  # free the memory now; the socket is being closed
        self._wake()
        self._on_overflow()

    def __len__(self) -> int:
        return self.queued


class Watch:
    def __init__(
        self,
        request_id: str,
        outbox: Outbox,
        after_seq: int = 0,
        submitted_at_ms: int | None = None,
        catching_up: bool = False,
        borrowed: tuple[str, int] | None = None,
        frames: Frames = WEBSOCKET_FRAMES,
        keep_text: bool = False,
        *,
        tenant_id: str,
    ) -> None:
        self.request_id = request_id
        self.tenant_id = tenant_id  # only events naming this tenant are applied
        self.frames = frames
        # Keep the folded text in `state` (an answer rendered whole at the end, not streamed).
        self.keep_text = keep_text
        # (topic, partition) read for this watch on behalf of another replica, if any.
        self.borrowed = borrowed
        self.outbox = outbox
        self.after_seq = after_seq
        self.state = RequestState(request_id=request_id, submitted_at_ms=submitted_at_ms)
        self.parked: list[events_pb2.Event] | None = [] if catching_up else None
        self.finished = False
        # Called once, right after the first token frame / the done frame is queued on the
        # socket (the gateway's client-side latency histograms).
        self.on_first_token: Callable[[], None] | None = None
        self.on_done: Callable[[], None] | None = None
        # Its tokens waiting in a batching outbox (more join it until the sender takes it).
        self._batch: TokenBatch | None = None

    def accepts(self, event: events_pb2.Event) -> bool:
        """Is the event this watch's tenant's? (another's is dropped, never applied)"""
        return event.tenant_id == self.tenant_id

    def on_live(self, event: events_pb2.Event) -> None:
        if self.parked is not None:
            self.parked.append(event)
            if len(self.parked) > self.outbox.limit:
                # The catch-up is this far behind: treat it like a slow socket.
                self.parked = []
                self.outbox.overflow()
            return
        self.apply(event)

    def end_catch_up(self) -> None:
        parked, self.parked = self.parked or [], None
        for ev in parked:
            self.apply(ev)

    def apply(self, event: events_pb2.Event) -> None:
        """Fold one event; emit what the client has not seen."""
        if self.finished:
            return
        state = self.state
        before = state.last_seq
        fold(state, event)
        # The fold keeps text for its callers; a streaming watch only needs last_seq for dedup.
        if not self.keep_text:
            state.text_parts.clear()
        state.token_ids.clear()
        if event.HasField("token_delta") and state.last_seq > before:
            seq = event.token_delta.seq
            if seq > self.after_seq:
                text = event.token_delta.text
                if self.outbox.batch_tokens:
                    self._batch = self.outbox.put_token(self._batch, self.request_id, seq, text)
                else:
                    # A front end may render nothing for an event (no text yet: split UTF-8).
                    frame = self.frames.token(self.request_id, seq, text)
                    if frame:
                        self.outbox.put(frame)
                if self.on_first_token is not None:
                    self.on_first_token()
                    self.on_first_token = None
        if state.terminal:
            self.finished = True
            frame = self.frames.done(state)
            if frame:
                self.outbox.put(frame)
            if self.on_done is not None:
                self.on_done()
                self.on_done = None


class Router:
    def __init__(
        self, on_foreign: Callable[[Watch, events_pb2.Event], None] = lambda _w, _e: None
    ) -> None:
        self.watches: dict[str, set[Watch]] = {}
        # An event of a watched request naming another tenant than the watch's (dropped).
        self.on_foreign = on_foreign

    def add(self, watch: Watch) -> None:
        self.watches.setdefault(watch.request_id, set()).add(watch)

    def remove(self, watch: Watch) -> None:
        ws = self.watches.get(watch.request_id)
        if ws is not None:
            ws.discard(watch)
            if not ws:
                del self.watches[watch.request_id]

    def deliver(self, event: events_pb2.Event) -> int:
        ws = self.watches.get(event.request_id)
        if not ws:
            return 0
        delivered = 0
        for w in list(ws):
            if not w.accepts(event):
                self.on_foreign(w, event)
                continue
            delivered += 1
            w.on_live(event)
            if w.finished:
                self.remove(w)
        return delivered

    def watched(self, request_id: str) -> bool:
        return bool(self.watches.get(request_id))

    def borrowed(self) -> set[tuple[str, int]]:
        """Partitions of other replicas that some watch still needs."""
        return {w.borrowed for ws in self.watches.values() for w in ws if w.borrowed is not None}
