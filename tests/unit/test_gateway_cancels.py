"""A client's cancel is written once and never for an ended request; a write that fails lets
the next cancel try again."""

from __future__ import annotations

import pytest

from gateway.cancels import Cancelled, Cancels
from gateway.inflight import Inflight
from gateway.metrics import GatewayMetrics
from gateway.prompts import PromptWriter
from gateway.store import ReplyRoute, RequestMeta, RequestStore


class FakeStore(RequestStore):
    def __init__(self) -> None:  # no Redis
        self.claimed: set[str] = set()

    async def claim_cancel(self, request_id: str) -> bool:
        if request_id in self.claimed:
            return False
        self.claimed.add(request_id)
        return True

    async def unclaim_cancel(self, request_id: str) -> None:
        self.claimed.discard(request_id)


class FakePrompts(PromptWriter):
    def __init__(self) -> None:  # no Kafka
        self.written: list[tuple[str, str, str]] = []
        self.fail = False

    async def cancel(self, request_id: str, tenant_id: str, reason: str) -> None:
        if self.fail:
            raise TimeoutError("no broker")
        self.written.append((request_id, tenant_id, reason))


def meta(rid: str, finished: bool = False) -> RequestMeta:
    return RequestMeta(rid, "t1", ReplyRoute("tokens", 0, 0), 0, "gw", finished=finished)


def new() -> tuple[Cancels, FakePrompts, Inflight]:
    prompts, inflight = FakePrompts(), Inflight()
    metrics = GatewayMetrics("test-cancels", lambda: 0, lambda: 0)
    cancels = Cancels(store=FakeStore(), prompts=prompts, inflight=inflight, metrics=metrics)
    return cancels, prompts, inflight


async def test_a_cancel_is_written_once_and_never_for_an_ended_request() -> None:
    cancels, prompts, inflight = new()
    assert await cancels.cancel(meta("r1")) is Cancelled.WRITTEN
    assert await cancels.cancel(meta("r1")) is Cancelled.DUPLICATE
    assert await cancels.cancel(meta("r2", finished=True)) is Cancelled.FINISHED
    inflight.finish("r3")  # its terminal event was read here
    assert await cancels.cancel(meta("r3")) is Cancelled.FINISHED
    assert prompts.written == [("r1", "t1", "client")]
    assert cancels.metrics.cancels == {"written": 1, "duplicate": 1, "finished": 2}


async def test_a_cancel_that_could_not_be_written_can_be_tried_again() -> None:
    cancels, prompts, _inflight = new()
    prompts.fail = True
    with pytest.raises(TimeoutError):
        await cancels.cancel(meta("r1"))
    prompts.fail = False
    assert await cancels.cancel(meta("r1")) is Cancelled.WRITTEN
    assert prompts.written == [("r1", "t1", "client")]
