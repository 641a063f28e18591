"""The pure retry/finish decision (worker/policy.py): docs/worker.md's tables as data."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmstream import codec
from llmstream.fold import fold
from llmstream.v1 import common_pb2, model_service_pb2
from worker import policy
from worker.attempt import WALL_TIME, AttemptOutcome, RpcFailure
from worker.core import Envelope

FR = common_pb2.FinishReason
S = grpc.StatusCode


def finished_with(
    reason: FR.ValueType, message: str = "", prompt_tokens: int = 0
) -> AttemptOutcome:
    fin = model_service_pb2.GenerateFinish(finish_reason=reason, message=message)
    if prompt_tokens:
        fin.usage.prompt_tokens = prompt_tokens
    fin.timings.total_us = 1234
    return AttemptOutcome(attempt=1, finish=fin)


def failed_with(code: grpc.StatusCode, details: str = "") -> AttemptOutcome:
    return AttemptOutcome(attempt=1, error=RpcFailure(code, details))


def decide(outcome: AttemptOutcome, retries: int = 0) -> policy.Retry | policy.Terminal:
    return policy.decide(outcome, retries=retries, max_retries=3, prompt_tokens=7)


def test_a_finish_ends_the_request_with_the_servers_usage_and_timings() -> None:
    t = decide(finished_with(FR.FINISH_REASON_STOP, "done", prompt_tokens=11))
    assert t == policy.Terminal(
        11, "done", FR.FINISH_REASON_STOP, timings=common_pb2.Timings(total_us=1234)
    )
    assert decide(finished_with(FR.FINISH_REASON_LENGTH)) == policy.Terminal(
        7, "", FR.FINISH_REASON_LENGTH, timings=common_pb2.Timings(total_us=1234)
    )  # no count from the server: the gateway's estimate


def test_an_engine_error_finish_is_failed_internal() -> None:
    t = decide(finished_with(FR.FINISH_REASON_ERROR))
    assert t == policy.Terminal(7, "model engine failure", failure="internal")


def test_a_stop_decided_by_the_worker_wins_and_is_never_retried() -> None:
    out = finished_with(FR.FINISH_REASON_CANCELLED)
    out.own_reason, out.own_message = FR.FINISH_REASON_CONTENT_FILTER, "blocked"
    t = decide(out)
    assert isinstance(t, policy.Terminal)
    assert (t.finish_reason, t.message, t.failure) == (
        FR.FINISH_REASON_CONTENT_FILTER,
        "blocked",
        "",
    )
    out = failed_with(S.UNAVAILABLE)  # the call cut after a stop: the stop stands
    out.own_reason, out.own_message = FR.FINISH_REASON_TIMEOUT, WALL_TIME
    assert policy.retryable_error(out) is None
    assert decide(out) == policy.Terminal(7, WALL_TIME, FR.FINISH_REASON_TIMEOUT)


@pytest.mark.parametrize("code", [S.UNAVAILABLE, S.RESOURCE_EXHAUSTED, S.UNKNOWN])
def test_retryable_statuses_retry_until_the_limit_then_fail(code: grpc.StatusCode) -> None:
    out = failed_with(code, "down")
    assert policy.retryable_error(out) == RpcFailure(code, "down")
    assert [decide(out, retries=n) for n in range(3)] == [
        policy.Retry(1, code),
        policy.Retry(2, code),
        policy.Retry(3, code),
    ]
    t = decide(out, retries=3)
    assert t == policy.Terminal(
        7,
        f"no model server could serve the request after 4 tries: {code.name}",
        failure="model_unavailable",
    )


def test_a_cancelled_finish_nobody_asked_for_is_a_drain_and_retried() -> None:
    out = finished_with(FR.FINISH_REASON_CANCELLED, "shutdown")
    error = policy.retryable_error(out)
    assert error == RpcFailure(S.UNAVAILABLE, "model server cancelled the stream: shutdown")
    assert decide(out) == policy.Retry(1, S.UNAVAILABLE)


@pytest.mark.parametrize(
    ("code", "details", "failure"),
    [
        (S.INVALID_ARGUMENT, "prompt exceeds the context window", "context_overflow"),
        (S.INVALID_ARGUMENT, "bad sampling", "invalid_request"),
        (S.NOT_FOUND, "no such model", "model_not_found"),
        (S.INTERNAL, "", "internal"),
    ],
)
def test_other_statuses_fail_at_once(code: grpc.StatusCode, details: str, failure: str) -> None:
    out = failed_with(code, details)
    assert policy.retryable_error(out) is None
    assert decide(out) == policy.Terminal(7, details or code.name, failure=failure)


@given(
    code=st.sampled_from(list(S)),
    own=st.sampled_from([None, FR.FINISH_REASON_CANCELLED, FR.FINISH_REASON_TIMEOUT]),
    retries=st.integers(0, 10),
)
def test_a_retry_is_only_ever_for_a_retryable_failure_within_the_limit(
    code: grpc.StatusCode, own: FR.ValueType | None, retries: int
) -> None:
    out = failed_with(code)
    out.own_reason = own
    step = policy.decide(out, retries=retries, max_retries=6, prompt_tokens=0)
    if isinstance(step, policy.Retry):
        assert own is None and code in (S.UNAVAILABLE, S.RESOURCE_EXHAUSTED, S.UNKNOWN)
        assert step.retry == retries + 1 <= 6
    elif own is not None:
        assert step.finish_reason == own and not step.failure


def test_a_cancel_or_the_wall_time_during_the_backoff_ends_the_request() -> None:
    assert policy.stopped_during_backoff(None, False, 7) is None
    assert policy.stopped_during_backoff("client", True, 7) == policy.Terminal(
        7, "client", FR.FINISH_REASON_CANCELLED
    )
    assert policy.stopped_during_backoff(None, True, 7) == policy.Terminal(
        7, WALL_TIME, FR.FINISH_REASON_TIMEOUT
    )
    assert policy.cancelled_before_start("client", 7) == policy.Terminal(
        7, "cancelled before start: client", FR.FINISH_REASON_CANCELLED
    )
    assert policy.crashed(KeyError("x"), 7) == policy.Terminal(
        7, "worker error: KeyError", failure="internal"
    )


def test_limits_cap_max_tokens_and_count_the_wall_time_from_submission() -> None:
    submit = codec.new_event("r1", "t1")
    submit.submitted.max_tokens = 500
    sent_ms = codec.event_time_ms(submit)
    lim = policy.limits(submit, default_timeout_ms=10_000, max_tokens_cap=0, now_ms=sent_ms + 4000)
    assert lim == policy.Limits(500, 6.0)
    submit.submitted.timeout_ms = 3000  # the prompt's own limit, already over
    lim = policy.limits(
        submit, default_timeout_ms=10_000, max_tokens_cap=200, now_ms=sent_ms + 4000
    )
    assert lim == policy.Limits(200, 0.0)
    submit.submitted.max_tokens = 0  # none asked: the worker's cap applies
    assert policy.limits(submit, default_timeout_ms=1, max_tokens_cap=64, now_ms=0).max_tokens == 64


def test_terminal_events_fold_into_the_request_state() -> None:
    env = Envelope("r1", "t1", "w")
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=5)
    done = policy.Terminal(3, "", FR.FINISH_REASON_STOP).event(env, usage, 4)
    state = fold(None, done)
    assert (state.status, state.finish_reason, state.completion_tokens) == ("completed", "stop", 5)
    failed = policy.Terminal(3, "gone", failure="model_unavailable").event(env, usage, 4)
    state = fold(None, failed)
    assert (state.status, state.error_code, state.finish_message) == (
        "failed",
        "model_unavailable",
        "gone",
    )
