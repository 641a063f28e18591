"""The per-attempt state machine (worker/attempt.py): fed server messages, it returns what the
shell does; no gRPC call, no Kafka."""

from __future__ import annotations

import grpc

from llmstream import codec
from llmstream.v1 import common_pb2, model_service_pb2
from worker.attempt import (
    WALL_TIME,
    Attempt,
    Delta,
    Phase,
    RpcFailure,
    Step,
    generate_start,
)
from worker.filters import Blocklist

FR = common_pb2.FinishReason


def delta(text: str, *ids: int) -> model_service_pb2.GenerateResponse:
    return model_service_pb2.GenerateResponse(
        delta=model_service_pb2.GenerateDelta(text=text, token_ids=ids)
    )


def finish(reason: FR.ValueType, message: str = "") -> model_service_pb2.GenerateResponse:
    return model_service_pb2.GenerateResponse(
        finish=model_service_pb2.GenerateFinish(finish_reason=reason, message=message)
    )


def fresh(
    attempts_before: int = 0,
    tokens_before: int = 0,
    max_tokens: int = 0,
    blocklist: Blocklist | None = None,
) -> Attempt:
    return Attempt(
        attempts_before=attempts_before,
        tokens_before=tokens_before,
        max_tokens=max_tokens,
        blocklist=blocklist,
    )


def test_the_first_message_opens_the_attempt_then_deltas_flow_until_the_finish() -> None:
    assert fresh().phase is Phase.CONNECTING
    a = fresh()
    assert a.on_message(delta("hel", 1)) == Step(started=1, emit=Delta("hel", [1]))
    assert a.on_message(delta("lo", 2, 3)) == Step(emit=Delta("lo", [2, 3]))
    assert a.phase is Phase.STREAMING and not a.ended
    assert a.on_message(finish(FR.FINISH_REASON_STOP)) == Step()
    assert a.ended
    out = a.outcome
    assert out.attempt == 1 and out.own_reason is None and out.error is None
    assert out.finish is not None and out.finish.finish_reason == FR.FINISH_REASON_STOP
    assert out.grpc_status == grpc.StatusCode.OK


def test_a_finish_as_first_message_still_produces_started() -> None:
    a = fresh(attempts_before=1)
    assert a.on_message(finish(FR.FINISH_REASON_LENGTH)) == Step(started=2)
    assert a.ended and a.outcome.attempt == 2


def test_takeover_continuation_numbers_the_attempt_and_counts_prior_tokens() -> None:
    """A continued request: attempt 3 (two in the log), 8 tokens already emitted, max 10."""
    a = fresh(attempts_before=2, tokens_before=8, max_tokens=10)
    assert a.on_message(delta("ab", 1, 2)) == Step(started=3, emit=Delta("ab", [1, 2]))
    # The 11th token: the server should have stopped; the worker does.
    assert a.on_message(delta("c", 3)) == Step(cancel=True)
    assert a.outcome.own_reason == FR.FINISH_REASON_LENGTH
    assert a.on_message(delta("d", 4)) == Step()  # dropped while stopping
    a.on_message(finish(FR.FINISH_REASON_CANCELLED))
    assert a.outcome.own_reason == FR.FINISH_REASON_LENGTH and a.outcome.attempt == 3

    submit = codec.new_event("r1", "t1")
    submit.submitted.model = "m"
    submit.submitted.prompt.text = "hi"
    submit.submitted.priority = 2
    start = generate_start(submit, 10, [5, 6, 7])
    assert start.request_id == "r1" and start.model == "m" and start.prompt.text == "hi"
    assert start.max_tokens == 10 and start.priority == 2
    assert list(start.continuation_token_ids) == [5, 6, 7]


def test_the_output_filter_stops_before_a_term_split_across_deltas() -> None:
    a = fresh(blocklist=Blocklist.parse("Secret"))
    assert a.on_message(delta("the sec", 1)).emit == Delta("the sec", [1])
    step = a.on_message(delta("ret plan", 2))
    assert step == Step(cancel=True)  # the delta completing the term is not emitted
    assert a.outcome.own_reason == FR.FINISH_REASON_CONTENT_FILTER
    assert a.outcome.own_message == "output filter: blocked term"


def test_a_cancel_drops_later_deltas_and_keeps_the_servers_finish() -> None:
    a = fresh()
    a.on_message(delta("x", 1))
    assert a.interrupt("client") is True  # first stop: send GenerateCancel
    assert a.interrupt("disconnect") is False  # the first reason stands
    assert a.phase is Phase.STOPPING and a.stopping
    assert a.on_message(delta("y", 2)) == Step()
    a.on_message(finish(FR.FINISH_REASON_CANCELLED, "stopped"))
    out = a.outcome
    assert (out.own_reason, out.own_message) == (FR.FINISH_REASON_CANCELLED, "client")
    assert out.finish is not None and out.finish.message == "stopped"


def test_no_cancel_means_the_wall_time_is_up() -> None:
    a = fresh()
    a.on_message(delta("x", 1))
    assert a.interrupt(None)
    assert (a.outcome.own_reason, a.outcome.own_message) == (FR.FINISH_REASON_TIMEOUT, WALL_TIME)


def test_a_stop_while_connecting_still_opens_the_attempt() -> None:
    a = fresh()
    assert a.interrupt("client")
    assert a.on_message(delta("x", 1)) == Step(started=1)  # `started`, but no token
    assert a.phase is Phase.STOPPING


def test_a_stop_after_the_end_changes_nothing() -> None:
    a = fresh()
    a.on_message(finish(FR.FINISH_REASON_STOP))
    assert a.interrupt("client") is False
    assert a.outcome.own_reason is None


def test_errors_end_the_attempt_unless_it_was_stopped() -> None:
    a = fresh()
    a.on_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert a.ended and a.outcome.attempt == 0  # never opened: no `started`
    assert a.outcome.error == RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert a.outcome.grpc_status == grpc.StatusCode.UNAVAILABLE

    a = fresh()
    a.on_message(delta("x", 1))
    a.on_end(grpc.StatusCode.OK, "")  # closed without a finish: a failure all the same
    assert a.outcome.error == RpcFailure(grpc.StatusCode.UNKNOWN, "stream ended without finish")

    a = fresh()
    a.on_message(delta("x", 1))
    a.interrupt("client")
    a.on_error(grpc.StatusCode.CANCELLED, "")  # the call cut after the grace period
    assert a.ended and a.outcome.error is None
    assert a.outcome.grpc_status == grpc.StatusCode.OK

    a = fresh()
    assert a.outcome.grpc_status == grpc.StatusCode.CANCELLED  # abandoned before any answer
