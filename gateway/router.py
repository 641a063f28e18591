"""Routing of token events to sockets (no I/O).

- `Outbox`: a socket's bounded send queue. `put` refuses (and marks the socket overflowed)
  when the socket is `limit` frames behind; the shell then closes it with code 4008, so a
  stalled reader never grows gateway memory beyond `limit` frames.
- `Watch`: one socket following one request. It folds every event it sees with the one fold
  (llmstream/fold.py), so redelivered or replayed events are dropped by seq, and emits a
  `token` frame per new seq above `after_seq` and one `done` frame at the terminal event.
  While a catch-up read from Kafka runs, live events are parked in `parked` and replayed
  after it (dedup by seq makes the overlap harmless: no gap, no duplicate).
- `Router`: request id -> watches (several sockets may watch one request).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gateway import protocol
from llmstream.fold import RequestState, fold
from llmstream.v1 import events_pb2


class Outbox:
    def __init__(
        self,
        limit: int,
        wake: Callable[[], None] = lambda: None,
        on_overflow: Callable[[], None] = lambda: None,
    ) -> None:
        self.limit = limit
        self._on_overflow = on_overflow
        self.frames: deque[str] = deque()
        self.overflowed = False
        self.closed = False
        self.high_water = 0  # most frames ever queued (tests assert the bound)
        self._wake = wake

    def put(self, frame: str) -> bool:
        if self.closed or self.overflowed:
            return False
        if len(self.frames) >= self.limit:
            self.overflow()
            return False
        self.frames.append(frame)
        if len(self.frames) > self.high_water:
            self.high_water = len(self.frames)
        self._wake()
        return True

    def overflow(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        self.frames.clear()  # free the memory now; the socket is being closed
        self._wake()
        self._on_overflow()

    def __len__(self) -> int:
        return len(self.frames)


def done_frame(state: RequestState) -> str:
    tokens_per_s = None
    total_ms = None
    if state.finished_at_ms is not None and state.submitted_at_ms is not None:
        total_ms = float(state.finished_at_ms - state.submitted_at_ms)
    if state.first_token_at_ms is not None and state.finished_at_ms is not None:
        span = (state.finished_at_ms - state.first_token_at_ms) / 1000
        if span > 0 and state.completion_tokens > 1:
            tokens_per_s = round((state.completion_tokens - 1) / span, 1)
    ttft = state.ttft_ms
    return protocol.Done(
        request_id=state.request_id,
        finish_reason=state.finish_reason or state.status.value,
        prompt_tokens=state.prompt_tokens,
        completion_tokens=state.completion_tokens,
        last_seq=state.last_seq,
        ttft_ms=float(ttft) if ttft is not None else None,
        tokens_per_s=tokens_per_s,
        total_ms=total_ms,
        message=state.finish_message,
        error_code=state.error_code,
    ).frame()


class Watch:
    def __init__(
        self,
        request_id: str,
        outbox: Outbox,
        after_seq: int = 0,
        submitted_at_ms: int | None = None,
        catching_up: bool = False,
        borrowed: tuple[str, int] | None = None,
    ) -> None:
        self.request_id = request_id
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

    @property
    def sent_seq(self) -> int:
        return max(self.after_seq, self.state.last_seq)

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
        # The fold keeps text for its callers; a watch only needs last_seq for dedup.
        state.text_parts.clear()
        state.token_ids.clear()
        if event.HasField("token_delta") and state.last_seq > before:
            seq = event.token_delta.seq
            if seq > self.after_seq:
                self.outbox.put(protocol.token(self.request_id, seq, event.token_delta.text))
                if self.on_first_token is not None:
                    self.on_first_token()
                    self.on_first_token = None
        if state.terminal:
            self.finished = True
            self.outbox.put(done_frame(state))
            if self.on_done is not None:
                self.on_done()
                self.on_done = None


class Router:
    def __init__(self) -> None:
        self.watches: dict[str, set[Watch]] = {}

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
        for w in list(ws):
            w.on_live(event)
            if w.finished:
                self.remove(w)
        return len(ws)

    def watched(self, request_id: str) -> bool:
        return bool(self.watches.get(request_id))

    def borrowed(self) -> set[tuple[str, int]]:
        """Partitions of other replicas that some watch still needs."""
        return {w.borrowed for ws in self.watches.values() for w in ws if w.borrowed is not None}
