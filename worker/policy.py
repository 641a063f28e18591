"""What happens to a request between its attempts, as pure functions: its limits, whether a
failed attempt is retried, and which terminal event ends it (docs/worker.md, "Stops decided by
the worker" and "Model server errors"). The executor asks; it never decides on its own."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from llmstream import codec
from llmstream.v1 import common_pb2, events_pb2
from worker.attempt import WALL_TIME, AttemptOutcome, RpcFailure
from worker.core import INTERNAL, MODEL_UNAVAILABLE, RETRYABLE, Envelope, failure_code

FR = common_pb2.FinishReason


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # 0: none
    remaining_s: float  # wall time left when the request starts


def limits(
    submit: events_pb2.Event, *, default_timeout_ms: int, max_tokens_cap: int, now_ms: int
) -> Limits:
    """The request's max_tokens (capped by the worker's `max_tokens_cap`, 0: no cap) and the
    wall time it has left: its `timeout_ms` (else the default) counts from its submission."""
    sub = submit.submitted
    timeout_ms = sub.timeout_ms or default_timeout_ms
    elapsed_ms = 0
    if submit.HasField("event_time"):
        elapsed_ms = max(0, now_ms - codec.event_time_ms(submit))
    max_tokens = sub.max_tokens
    if max_tokens_cap and (not max_tokens or max_tokens > max_tokens_cap):
        max_tokens = max_tokens_cap
    return Limits(max_tokens, max(0, timeout_ms - elapsed_ms) / 1000.0)


@dataclass(frozen=True)
class Terminal:
    """The request's one terminal event, as data: `completed` with `finish_reason`, or
    `failed` when `failure` (a failure code) is set."""

    prompt_tokens: int
    message: str
    finish_reason: FR.ValueType = FR.FINISH_REASON_UNSPECIFIED
    failure: str = ""
    timings: common_pb2.Timings | None = None

    def event(self, env: Envelope, usage: common_pb2.Usage, last_seq: int) -> events_pb2.Event:
        if self.failure:
            return env.failed(self.failure, self.message, usage, last_seq)
        return env.completed(self.finish_reason, usage, self.timings, last_seq, self.message)


@dataclass(frozen=True)
class Retry:
    """Try again on another replica after a backoff; `retry` counts from 1."""

    retry: int
    code: grpc.StatusCode


def retryable_error(outcome: AttemptOutcome) -> RpcFailure | None:
    """The failure another replica (or this one later) may not have: a retryable status, or a
    `cancelled` finish nobody here asked for (a model server draining), unless the worker
    stopped the stream itself. None: the replica did its job."""
    if outcome.own_reason is not None:
        return None
    fin = outcome.finish
    if fin is not None and fin.finish_reason == FR.FINISH_REASON_CANCELLED:
        reason = fin.message or "no reason"
        return RpcFailure(
            grpc.StatusCode.UNAVAILABLE, f"model server cancelled the stream: {reason}"
        )
    if outcome.error is not None and outcome.error.code in RETRYABLE:
        return outcome.error
    return None


def decide(
    outcome: AttemptOutcome, *, retries: int, max_retries: int, prompt_tokens: int
) -> Retry | Terminal:
    """After an attempt that made `retries` retries so far: retry, or end the request.
    `prompt_tokens`: the gateway's estimate, replaced by the server's count when it sent one."""
    error = retryable_error(outcome)
    if error is None:
        return finished(outcome, prompt_tokens)
    tries = retries + 1
    if tries > max_retries:
        message = f"no model server could serve the request after {tries} tries"
        return Terminal(prompt_tokens, f"{message}: {error.code.name}", failure=MODEL_UNAVAILABLE)
    return Retry(tries, error.code)


def finished(outcome: AttemptOutcome, prompt_tokens: int) -> Terminal:
    """The terminal event of a stream that is not retried."""
    fin = outcome.finish
    if fin is not None and fin.HasField("usage") and fin.usage.prompt_tokens:
        prompt_tokens = fin.usage.prompt_tokens
    timings = fin.timings if fin is not None else None
    if outcome.own_reason is not None:
        return Terminal(prompt_tokens, outcome.own_message, outcome.own_reason, timings=timings)
    if fin is not None and fin.finish_reason != FR.FINISH_REASON_ERROR:
        return Terminal(prompt_tokens, fin.message, fin.finish_reason, timings=timings)
    if fin is not None:
        return Terminal(prompt_tokens, fin.message or "model engine failure", failure=INTERNAL)
    error = outcome.error
    assert error is not None, "an attempt ends with a finish, a stop or an error"
    return Terminal(
        prompt_tokens,
        error.details or error.code.name,
        failure=failure_code(error.code, error.details),
    )


def stopped_during_backoff(
    cancel_reason: str | None, timed_out: bool, prompt_tokens: int
) -> Terminal | None:
    """A cancel or the wall-time limit while waiting to retry ends the request; None: retry."""
    if cancel_reason is not None:
        return Terminal(prompt_tokens, cancel_reason, FR.FINISH_REASON_CANCELLED)
    if timed_out:
        return Terminal(prompt_tokens, WALL_TIME, FR.FINISH_REASON_TIMEOUT)
    return None


def cancelled_before_start(reason: str, prompt_tokens: int) -> Terminal:
    return Terminal(prompt_tokens, f"cancelled before start: {reason}", FR.FINISH_REASON_CANCELLED)


def crashed(error: BaseException, prompt_tokens: int) -> Terminal:
    """A bug in the worker: the request ends `failed` internal instead of blocking its
    partition's commits."""
    return Terminal(prompt_tokens, f"worker error: {type(error).__name__}", failure=INTERNAL)
