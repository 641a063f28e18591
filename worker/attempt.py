"""One Generate stream of a request, as a synchronous state machine.

The async shell (`worker.executor`) moves bytes: it writes the `start`, reads server messages
and feeds them here, and does what each `Step` says (produce `started`, push a delta, ask the
server to stop). Every decision about the stream is made here, so it is unit-tested without
gRPC or Kafka (tests/unit/test_worker_attempt.py).

Phases and their transitions:

    CONNECTING --first server message--> STREAMING --finish / error / end of stream--> ENDED
    CONNECTING | STREAMING --stop (cancel, wall time, filter, length)--> STOPPING
    STOPPING --finish / end of stream--> ENDED

- The first message of any kind opens the attempt, even one stopped while connecting:
  `Step.started` carries the attempt number (the request's attempts so far + 1) and the shell
  produces `started` before anything else.
- While STOPPING, deltas are dropped (the client gets no tokens after a stop) and gRPC errors
  are ignored (the stop is the outcome); the server's `finish` still brings usage and timings.
- `stop` after ENDED changes nothing: the stream's own end stands.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from llmstream.v1 import common_pb2, events_pb2, model_service_pb2
from worker.filters import Blocklist

FR = common_pb2.FinishReason

WALL_TIME = "wall-time limit reached"


class Phase(enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STOPPING = "stopping"
    ENDED = "ended"


@dataclass(frozen=True)
class RpcFailure:
    """How a Generate call failed: a gRPC status and its details."""

    code: grpc.StatusCode
    details: str


@dataclass
class AttemptOutcome:
    """How one stream ended."""

    attempt: int  # the request's attempt count after this stream (+1 if it opened)
    finish: model_service_pb2.GenerateFinish | None = None
    own_reason: FR.ValueType | None = None  # a stop decided by the worker
    own_message: str = ""
    error: RpcFailure | None = None

    @property
    def grpc_status(self) -> grpc.StatusCode:
        """The status the client span records."""
        if self.error is not None:
            return self.error.code
        if self.finish is not None or self.own_reason is not None:
            return grpc.StatusCode.OK
        return grpc.StatusCode.CANCELLED


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Step:
    """What the shell does after one server message, in this order (it reads the next one
    until the attempt has `ended`)."""

    started: int | None = None  # produce `started` with this attempt number
    emit: Delta | None = None  # push this delta to the emitter
    cancel: bool = False  # the worker decided to stop: send GenerateCancel


class Attempt:
    def __init__(
        self,
        *,
        attempts_before: int,
        tokens_before: int,
        max_tokens: int,
        blocklist: Blocklist | None = None,
    ) -> None:
        """`tokens_before`: tokens of the request already emitted (earlier attempts, takeover);
        `max_tokens` 0: no worker-side length guard."""
        self.phase = Phase.CONNECTING
        self._opened = False
        self.outcome = AttemptOutcome(attempt=attempts_before)
        self._tokens = tokens_before
        self._max_tokens = max_tokens
        self._filter = blocklist.stream() if blocklist else None

    @property
    def stopping(self) -> bool:
        return self.outcome.own_reason is not None

    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    def on_message(self, msg: model_service_pb2.GenerateResponse) -> Step:
        started = None
        if not self._opened:
            self._opened = True
            self.outcome.attempt += 1
            started = self.outcome.attempt
            if self.phase is Phase.CONNECTING:
                self.phase = Phase.STREAMING
        kind = msg.WhichOneof("kind")
        if kind == "finish":
            self.outcome.finish = msg.finish
            self.phase = Phase.ENDED
            return Step(started=started)
        if kind != "delta" or self.phase is not Phase.STREAMING:
            return Step(started=started)
        return self._delta(msg.delta, started)

    def _delta(self, delta: model_service_pb2.GenerateDelta, started: int | None) -> Step:
        if self._filter is not None and self._filter.check(delta.text) is not None:
            # The delta that completes a blocked term is not emitted.
            self.stop(FR.FINISH_REASON_CONTENT_FILTER, "output filter: blocked term")
            return Step(started=started, cancel=True)
        if self._max_tokens and self._tokens + len(delta.token_ids) > self._max_tokens:
            # The server enforces max_tokens too; this only guards against a bad one.
            self.stop(FR.FINISH_REASON_LENGTH, "max_tokens reached")
            return Step(started=started, cancel=True)
        self._tokens += len(delta.token_ids)
        return Step(started=started, emit=Delta(delta.text, list(delta.token_ids)))

    def stop(self, reason: FR.ValueType, message: str) -> bool:
        """A stop decided by the worker. True if it is the first: ask the server to stop."""
        if self.phase is Phase.ENDED or self.stopping:
            return False
        self.outcome.own_reason = reason
        self.outcome.own_message = message
        self.phase = Phase.STOPPING
        return True

    def interrupt(self, cancel_reason: str | None) -> bool:
        """The request was cancelled (`cancel_reason`) or, without one, its wall time is up."""
        if cancel_reason is not None:
            return self.stop(FR.FINISH_REASON_CANCELLED, cancel_reason)
        return self.stop(FR.FINISH_REASON_TIMEOUT, WALL_TIME)

    def on_end(self, code: grpc.StatusCode, details: str) -> None:
        """The server closed the stream without a `finish`: a failure even with status OK."""
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN
        self.outcome.error = RpcFailure(code, details or "stream ended without finish")
        self.phase = Phase.ENDED

    def on_error(self, code: grpc.StatusCode, details: str) -> None:
        """The call raised. After a stop this is the call being cut short: the stop stands."""
        if not self.stopping:
            self.outcome.error = RpcFailure(code, details)
        self.phase = Phase.ENDED


def generate_start(
    submit: events_pb2.Event, max_tokens: int, continuation: Sequence[int]
) -> model_service_pb2.GenerateStart:
    """The `start` of an attempt; `continuation`: every token already in the log (takeover,
    retry), which the server continues from instead of starting over."""
    sub = submit.submitted
    return model_service_pb2.GenerateStart(
        request_id=submit.request_id,
        model=sub.model,
        prompt=sub.prompt,
        sampling=sub.sampling,
        max_tokens=max_tokens,
        priority=sub.priority,
        continuation_token_ids=continuation,
    )
