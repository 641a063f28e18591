"""The one event-folding function: events -> request state.

Gateway resume, worker takeover, the aggregator and `llmstream replay` all rebuild a request
from its events with `fold`; nothing else interprets event sequences.

Properties the callers rely on (tests/unit/test_fold.py checks each):
- Deterministic: the same events give the same state.
- Order-tolerant across topics: a request's events live on two topics (prompts, tokens), so a
  reader of both may see `started` before `submitted`. Status only moves forward
  (queued < running < terminal), never back.
- Idempotent under redelivery: a token delta whose seq was already folded is dropped and
  counted in `duplicates`; a second terminal event is ignored and counted in
  `extra_terminals` (so a redelivered terminal event can never bill twice).
- Gaps are visible: a seq jump, or a terminal `last_seq` beyond what was folded, is counted in
  `missing_seqs` instead of being silently accepted.
- Fenced: an event whose `fence` (owner generation, attempt) is older than the newest fence
  folded so far was written by a worker that no longer owns the request (a zombie); it is
  ignored and counted in `fenced`. Events without a fence (the gateway's, older workers') are
  never stale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from llmstream.v1 import common_pb2, events_pb2


class Status(StrEnum):
    UNKNOWN = "unknown"  # only events of the tokens topic seen so far
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


_RANK = {
    Status.UNKNOWN: 0,
    Status.QUEUED: 1,
    Status.RUNNING: 2,
    Status.COMPLETED: 3,
    Status.CANCELLED: 3,
    Status.FAILED: 3,
}

TERMINAL = frozenset({Status.COMPLETED, Status.CANCELLED, Status.FAILED})

# Event bodies that end a request: exactly one of them per request counts (`extra_terminals`).
TERMINAL_BODIES = frozenset({"completed", "failed"})


def finish_reason_name(reason: common_pb2.FinishReason.ValueType) -> str:
    """`FINISH_REASON_STOP` -> `stop` (the spelling used in JSON, SQL and the WebSocket)."""
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def is_terminal(event: events_pb2.Event) -> bool:
    return event.WhichOneof("body") in TERMINAL_BODIES


def outcome(event: events_pb2.Event) -> str:
    """A terminal event's outcome label (metrics, spans): its finish reason, or its failure
    code (`failed` when it has none)."""
    if event.HasField("failed"):
        return event.failed.code or "failed"
    return finish_reason_name(event.completed.finish_reason)


@dataclass
class RequestState:
    request_id: str
    tenant_id: str = ""
    status: Status = Status.UNKNOWN
    model: str = ""
    max_tokens: int = 0
    reserved_tokens: int = 0
    estimated_prompt_tokens: int = 0
    idempotency_key: str = ""
    # True once the request's `submitted` event was folded (model, tenant and reservation are
    # known): the aggregator bills a terminal request only then.
    submitted_seen: bool = False
    reply_topic: str = ""
    reply_partition: int = -1
    gateway_id: str = ""
    # Wall-clock milliseconds from the events' event_time.
    submitted_at_ms: int | None = None
    started_at_ms: int | None = None
    first_token_at_ms: int | None = None
    finished_at_ms: int | None = None
    attempts: int = 0
    worker_id: str = ""
    model_server: str = ""
    model_version: str = ""
    last_seq: int = 0
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    cancel_requested: bool = False
    cancel_reason: str = ""
    finish_reason: str = ""
    finish_message: str = ""
    error_code: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_us: int = 0
    ttft_us: int = 0
    total_us: int = 0
    events: int = 0
    duplicates: int = 0
    missing_seqs: int = 0
    extra_terminals: int = 0
    # The newest Event.fence folded (generation, attempt) and the older ones ignored.
    fence_generation: int = 0
    fence_attempt: int = 0
    fenced: int = 0

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def ttft_ms(self) -> int | None:
        """Submit -> first token, by the events' wall clocks (None until both are known)."""
        if self.submitted_at_ms is None or self.first_token_at_ms is None:
            return None
        return self.first_token_at_ms - self.submitted_at_ms

    def as_dict(self, include_text: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v for k, v in self.__dict__.items() if k not in ("text_parts", "token_ids")
        }
        out["status"] = self.status.value
        out["ttft_ms"] = self.ttft_ms
        out["tokens_folded"] = len(self.token_ids)
        if include_text:
            out["text"] = self.text
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestState:
        """Rebuild a state persisted with `as_dict` so folding can continue where it stopped.

        Derived keys (`ttft_ms`, `tokens_folded`) are ignored and unknown keys are skipped, so
        rows written by an older or newer version still load; missing keys take the defaults.
        `text` becomes the first text part. Token ids are not part of `as_dict` and restart
        empty: the fold's dedup uses `last_seq`, so folding goes on correctly without them.
        """
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in _PERSISTED_FIELDS}
        if "status" in kwargs:
            kwargs["status"] = Status(kwargs["status"])
        state = cls(**kwargs)
        text = data.get("text")
        if text:
            state.text_parts = [str(text)]
        return state


_PERSISTED_FIELDS = frozenset(
    f for f in RequestState.__dataclass_fields__ if f not in ("text_parts", "token_ids")
)


def _advance(state: RequestState, status: Status) -> None:
    if _RANK[status] > _RANK[state.status]:
        state.status = status


def fold(state: RequestState | None, event: events_pb2.Event) -> RequestState:
    """Apply one event to a request's state (mutated in place and returned).

    `state` None starts a new request. The event must belong to the request.
    """
    if state is None:
        state = RequestState(request_id=event.request_id)
    elif event.request_id != state.request_id:
        raise ValueError(f"event of {event.request_id!r} folded into {state.request_id!r}")
    state.events += 1
    if event.HasField("fence") and _stale(state, event.fence):
        state.fenced += 1
        return state
    if event.tenant_id and not state.tenant_id:
        state.tenant_id = event.tenant_id
    at_ms = int(event.event_time.ToMilliseconds()) if event.HasField("event_time") else None
    kind = event.WhichOneof("body")

    if kind == "token_delta":
        _fold_delta(state, event.token_delta, at_ms)
    elif kind == "submitted":
        s = event.submitted
        state.submitted_seen = True
        state.model = s.model
        state.max_tokens = s.max_tokens
        state.reserved_tokens = s.reserved_tokens
        state.estimated_prompt_tokens = s.estimated_prompt_tokens
        state.idempotency_key = s.idempotency_key
        state.reply_topic = s.reply.topic
        state.reply_partition = s.reply.partition
        state.gateway_id = s.reply.gateway_id
        if state.submitted_at_ms is None:
            state.submitted_at_ms = at_ms
        _advance(state, Status.QUEUED)
    elif kind == "cancel_requested":
        if not state.cancel_requested:
            state.cancel_requested = True
            state.cancel_reason = event.cancel_requested.reason
    elif kind == "started":
        st = event.started
        state.attempts = max(state.attempts, st.attempt)
        state.worker_id = st.worker_id
        state.model_server = st.model_server
        state.model_version = st.model_version
        if state.started_at_ms is None:
            state.started_at_ms = at_ms
        _advance(state, Status.RUNNING)
    elif kind == "completed":
        c = event.completed
        if _accept_terminal(state, c.last_seq, at_ms):
            state.finish_reason = finish_reason_name(c.finish_reason)
            state.finish_message = c.message
            state.prompt_tokens = c.usage.prompt_tokens
            state.completion_tokens = c.usage.completion_tokens
            state.queue_us = c.timings.queue_us
            state.ttft_us = c.timings.time_to_first_token_us
            state.total_us = c.timings.total_us
            if c.finish_reason == common_pb2.FINISH_REASON_CANCELLED:
                state.status = Status.CANCELLED
            elif c.finish_reason == common_pb2.FINISH_REASON_ERROR:
                state.status = Status.FAILED
            else:
                state.status = Status.COMPLETED
    elif kind == "failed":
        f = event.failed
        if _accept_terminal(state, f.last_seq, at_ms):
            state.finish_reason = "error"
            state.error_code = f.code
            state.finish_message = f.message
            state.prompt_tokens = f.usage.prompt_tokens
            state.completion_tokens = f.usage.completion_tokens
            state.status = Status.FAILED
    return state


def _stale(state: RequestState, fence: events_pb2.Fence) -> bool:
    """True for an event of an older owner or attempt than the newest folded; otherwise its
    fence becomes the newest."""
    key = (fence.generation, fence.attempt)
    if key < (state.fence_generation, state.fence_attempt):
        return True
    state.fence_generation, state.fence_attempt = key
    return False


def _fold_delta(state: RequestState, delta: events_pb2.TokenDelta, at_ms: int | None) -> None:
    if delta.seq <= state.last_seq:
        state.duplicates += 1
        return
    state.missing_seqs += delta.seq - state.last_seq - 1
    state.last_seq = delta.seq
    state.text_parts.append(delta.text)
    state.token_ids.extend(delta.token_ids)
    if state.first_token_at_ms is None:
        state.first_token_at_ms = at_ms
    _advance(state, Status.RUNNING)


def _accept_terminal(state: RequestState, last_seq: int, at_ms: int | None) -> bool:
    if state.terminal:
        state.extra_terminals += 1
        return False
    if last_seq > state.last_seq:
        state.missing_seqs += last_seq - state.last_seq
    state.finished_at_ms = at_ms
    return True


def fold_all(events: Iterable[events_pb2.Event]) -> dict[str, RequestState]:
    """Fold a stream of events of many requests; returns states by request id."""
    states: dict[str, RequestState] = {}
    for event in events:
        states[event.request_id] = fold(states.get(event.request_id), event)
    return states
