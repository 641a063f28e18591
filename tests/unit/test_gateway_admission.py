"""Admission decisions: gate, caps, reservation size, the submitted event; the façade's steps,
idempotent replay, quota refusal and rollback of exactly the steps done."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from gateway import errors
from gateway.admission import (
    UNCHECKED,
    Admission,
    Admitted,
    ChatMessage,
    Load,
    ModelView,
    Policy,
    Steps,
    SubmitRequest,
    Undo,
    cap_max_tokens,
    estimate_prompt_tokens,
    plan_submit,
    submitted_event,
    undo_after,
)
from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.inflight import Inflight
from gateway.metrics import GatewayMetrics
from gateway.models import Models
from gateway.prompts import PromptWriter, SendAttempt
from gateway.quota import Decision, Limits, Quota
from gateway.server import prompt_lag
from gateway.store import ReplyRoute, RequestMeta, RequestStore
from llmstream import catalog, codec
from llmstream.catalog import CatalogFollower, ServedModel
from llmstream.v1 import events_pb2, model_service_pb2

LIMITS = Limits("standard", 60, 10_000, 100_000, 4, 100, 8)
PRINCIPAL = Principal("t1", "k1", LIMITS)
POLICY = Policy(max_inflight=10, max_prompt_lag=0, shed_max_tokens=20)
IDLE = Load(inflight=0)
AT_NS = 1_700_000_000_123_456_789
ROUTE = ReplyRoute("tokens", 3, 42)


def req(**kw: Any) -> SubmitRequest:
    fields: dict[str, Any] = {"model": "m", "max_tokens": 50, "prompt": "x" * 40}
    return SubmitRequest(**{**fields, **kw})


# ---- the pure core ----------------------------------------------------------------------------


def test_caps_tier_then_load() -> None:
    assert cap_max_tokens(50, LIMITS, IDLE, POLICY) == (50, None)
    assert cap_max_tokens(500, LIMITS, IDLE, POLICY) == (100, "tier")
    busy = Load(inflight=5)  # half of max_inflight: shedding
    assert cap_max_tokens(50, LIMITS, busy, POLICY) == (20, "load")
    assert cap_max_tokens(500, LIMITS, busy, POLICY) == (20, "load")
    assert cap_max_tokens(10, LIMITS, busy, POLICY) == (10, None)
    no_shed = Policy(max_inflight=10)
    assert cap_max_tokens(50, LIMITS, busy, no_shed) == (50, None)


def test_model_cap_then_tier_then_load() -> None:
    # The model's limit first: a WebSocket request above it is capped and says "model".
    assert cap_max_tokens(90, LIMITS, IDLE, POLICY, 60) == (60, "model")
    assert cap_max_tokens(60, LIMITS, IDLE, POLICY, 60) == (60, None)
    assert cap_max_tokens(500, LIMITS, IDLE, POLICY, 200) == (100, "tier")  # the lower one wins
    assert cap_max_tokens(90, LIMITS, Load(inflight=5), POLICY, 60) == (20, "load")
    assert cap_max_tokens(5000, LIMITS, IDLE, POLICY, 0) == (100, "tier")  # 0: limit unknown


def test_over_the_model_limit_is_refused_naming_max_tokens_when_asked() -> None:
    with pytest.raises(GatewayError) as refused:
        cap_max_tokens(90, LIMITS, IDLE, POLICY, 60, refuse_over_model=True)
    err = refused.value
    assert (err.code, err.field, err.reason) == (errors.INVALID_REQUEST, "max_tokens", "model")
    assert "90" in err.message and "60" in err.message
    assert cap_max_tokens(60, LIMITS, IDLE, POLICY, 60, refuse_over_model=True) == (60, None)


def test_max_tokens_left_out_is_the_models_limit_then_the_tiers() -> None:
    assert cap_max_tokens(None, LIMITS, IDLE, POLICY, 64) == (64, None)
    assert cap_max_tokens(None, LIMITS, IDLE, POLICY, 1024) == (100, None)  # tier, not "capped"
    assert cap_max_tokens(None, LIMITS, IDLE, POLICY, 0) == (100, None)
    assert cap_max_tokens(None, LIMITS, Load(inflight=5), POLICY, 64) == (20, None)


def test_plan_checks_the_model_against_the_catalog_view() -> None:
    def plan(view: ModelView, **kw: Any) -> tuple[int, str | None]:
        p = plan_submit(PRINCIPAL, req(**kw), IDLE, POLICY, "r", AT_NS, view)
        return p.max_tokens, p.capped

    served = ModelView(True, served=True, limit=30)
    assert plan(served) == (30, "model")
    assert plan(UNCHECKED) == (50, None)  # not read yet: unchecked, the worker answers
    assert plan(ModelView(True, served=True)) == (50, None)  # served, limit unknown
    with pytest.raises(GatewayError) as unknown:
        plan(ModelView(True))
    assert (unknown.value.code, unknown.value.field) == (errors.MODEL_NOT_FOUND, "model")
    assert not unknown.value.retryable
    with pytest.raises(GatewayError) as gone:
        plan(ModelView(True, known=True, retry_after_ms=10_000))
    assert (gone.value.code, gone.value.retry_after_ms) == (errors.MODEL_UNAVAILABLE, 10_000)
    with pytest.raises(GatewayError) as strict:
        plan(served, refuse_over_model_limit=True)
    assert strict.value.field == "max_tokens"


def _announce(cat: catalog.Catalog, name: str, at_ms: int, max_tokens: int = 64) -> None:
    info = model_service_pb2.ModelInfo(name=name, max_context=2048, max_tokens=max_tokens)
    ann = catalog.announcement(
        ServedModel(info, ("ms:1",)), announcer_id="w0", interval_ms=1000, now_ms=at_ms
    )
    cat.apply(catalog.key(name), catalog.encode(ann))


def test_models_view_of_the_followed_catalog() -> None:
    now = [10_000]
    follower = CatalogFollower(None, "models", "gw-catalog")  # type: ignore[arg-type]  # never run
    models = Models(follower=follower, clock_ms=lambda: now[0])
    cat = follower.catalog
    _announce(cat, "m", 10_000)
    assert models.view("m") == UNCHECKED  # not read to the end yet
    follower.ready.set()
    assert models.view("m") == ModelView(True, served=True, limit=64)
    assert models.view("nope") == ModelView(True)
    assert [e.name for e in models.served()] == ["m"]
    _announce(cat, "old", 5_000)  # expired (3 intervals): known, not served
    assert models.view("old") == ModelView(True, known=True, retry_after_ms=1000)
    now[0] = 20_000  # nothing served any more: the catalog does not decide
    assert models.served() == [] and models.view("nope") == UNCHECKED


def test_prompt_lag_sheds_and_refuses_only_when_bounded() -> None:
    lagging = Policy(max_inflight=10, max_prompt_lag=8, shed_max_tokens=20)
    assert not Load(0, prompt_lag=3).shedding(lagging)
    assert Load(0, prompt_lag=4).shedding(lagging)
    assert not Load(0, prompt_lag=7).overloaded(lagging)
    assert Load(0, prompt_lag=8).overloaded(lagging)
    assert not Load(0, prompt_lag=10**6).overloaded(POLICY)  # 0: the lag bound is off


def test_gate_refusals_are_typed_and_retryable() -> None:
    with pytest.raises(GatewayError) as draining:
        plan_submit(PRINCIPAL, req(), Load(0, draining=True), POLICY, "r", AT_NS)
    assert (draining.value.code, draining.value.reason) == (errors.OVERLOADED, "draining")
    assert draining.value.retry_after_ms == 500 and draining.value.retryable
    with pytest.raises(GatewayError) as full:
        plan_submit(PRINCIPAL, req(), Load(10), POLICY, "r", AT_NS)
    assert (full.value.code, full.value.reason) == (errors.OVERLOADED, "overloaded")
    assert full.value.retry_after_ms == 1000


def test_plan_sizes_the_reservation() -> None:
    plan = plan_submit(PRINCIPAL, req(max_tokens=500), IDLE, POLICY, "r", AT_NS)
    assert (plan.max_tokens, plan.capped) == (100, "tier")
    assert plan.estimated_prompt_tokens == 11  # 40 chars / 4 + 1
    assert plan.reserved_tokens == 111
    assert plan.at_ms == AT_NS // 1_000_000
    assert plan.idempotency_key is None
    assert (
        plan_submit(PRINCIPAL, req(idempotency_key=""), IDLE, POLICY, "r", 0).idempotency_key
        is None
    )


def test_estimate_prompt_tokens() -> None:
    assert estimate_prompt_tokens(req(prompt="x" * 400)) == 101
    chat = req(prompt=None, messages=(ChatMessage("user", "abcd"), ChatMessage("system", "ef")))
    # (4 + 4 + 2 + 6) chars // 4 + 1, + 4 per message
    assert estimate_prompt_tokens(chat) == 4 + 1 + 8


def test_submitted_event_carries_plan_request_and_route() -> None:
    chat = req(
        prompt=None,
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
        temperature=0.5,
        seed=7,
        stop=("\n",),
        idempotency_key="k",
    )
    plan = plan_submit(PRINCIPAL, chat, IDLE, POLICY, "req_1", AT_NS)
    ev = submitted_event(plan, chat, ROUTE, "gw-0")
    assert (ev.request_id, ev.tenant_id, ev.producer_id) == ("req_1", "t1", "gw-0")
    assert ev.event_time.ToNanoseconds() == AT_NS
    s = ev.submitted
    assert [(m.role, m.content) for m in s.prompt.chat.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
    ]
    assert s.sampling.temperature == 0.5 and s.sampling.seed == 7
    assert not s.sampling.HasField("top_p") and list(s.sampling.stop) == ["\n"]
    assert (s.reply.topic, s.reply.partition, s.reply.gateway_id) == ("tokens", 3, "gw-0")
    assert (s.max_tokens, s.reserved_tokens, s.idempotency_key) == (50, plan.reserved_tokens, "k")
    codec.encode(ev)  # a complete event


def test_prompt_lag_sums_uncommitted_prompts() -> None:
    class Committed:
        def __init__(self, offset: int) -> None:
            self.offset = offset

    ends = {"p0": 10, "p1": 5, "p2": 7}
    assert prompt_lag(ends, {"p0": Committed(4), "p1": Committed(-1)}) == 6 + 5 + 7


# ---- the façade with in-memory collaborators ----------------------------------------------------


class FakeQuota(Quota):
    def __init__(self, refuse: str = "") -> None:  # no Redis
        self.refuse = refuse
        self.reserved: dict[str, int] = {}
        self.released: list[tuple[str, str, int, int]] = []
        self.fail_release = False

    async def reserve(self, tenant_id: str, request_id: str, *args: Any, **kw: Any) -> Decision:
        _at_ms, _now_ms, reserved, _limits = args  # as the admission passes them
        if self.refuse:
            return Decision(False, self.refuse, 1234)
        self.reserved[request_id] = reserved
        return Decision(True)

    async def release(self, tenant_id: str, request_id: str, at_ms: int) -> bool:
        if self.fail_release:
            raise ConnectionError("redis down")
        self.released.append((tenant_id, request_id, at_ms, self.reserved[request_id]))
        return True


class FakeStore(RequestStore):
    def __init__(self) -> None:  # no Redis
        self.idempotency: dict[tuple[str, str], str] = {}
        self.meta: dict[str, RequestMeta] = {}
        self.watchers: dict[str, set[str]] = {}
        self.fail_record = False

    async def claim_idempotency(self, tenant_id: str, key: str, request_id: str) -> str | None:
        holder = self.idempotency.get((tenant_id, key))
        if holder is None:
            self.idempotency[(tenant_id, key)] = request_id
        return holder

    async def release_idempotency(self, tenant_id: str, key: str) -> None:
        self.idempotency.pop((tenant_id, key), None)

    async def take_over_idempotency(
        self, tenant_id: str, key: str, stale: str, request_id: str
    ) -> bool:
        if self.idempotency.get((tenant_id, key), stale) != stale:
            return False
        self.idempotency[(tenant_id, key)] = request_id
        return True

    async def record(self, meta: RequestMeta, watcher: str) -> None:
        if self.fail_record:
            raise ConnectionError("redis down")
        self.meta[meta.request_id] = meta
        self.watchers.setdefault(meta.request_id, set()).add(watcher)

    async def forget(self, request_id: str) -> None:
        self.meta.pop(request_id, None)

    async def wait_for(
        self, tenant_id: str, request_id: str, attempts: int = 40, interval_s: float = 0.025
    ) -> RequestMeta | None:
        return self.meta.get(request_id)


class FakePrompts(PromptWriter):
    """`fail`: the producer refuses the record before taking it (surely not written);
    `time_out`: it takes the record, then the acknowledgement does not come in time."""

    def __init__(self, fail: bool = False, time_out: bool = False) -> None:  # no Kafka
        self.fail = fail
        self.time_out = time_out
        self.written: list[events_pb2.Event] = []

    async def submit(self, event: events_pb2.Event, attempt: SendAttempt | None = None) -> None:
        if self.fail:
            raise KafkaConnectionError("no broker")
        assert attempt is not None
        attempt.handed_over = True
        self.written.append(event)
        if self.time_out:
            raise TimeoutError()


class FakeFollower:
    watcher = "gw-0/sock1"

    def __init__(self) -> None:
        self.followed: list[Admitted] = []
        self.unfollowed: list[str] = []

    def follow(self, admitted: Admitted) -> None:
        self.followed.append(admitted)

    def unfollow(self, request_id: str) -> None:
        self.unfollowed.append(request_id)


class World:
    def __init__(self, quota: FakeQuota | None = None, prompts: FakePrompts | None = None) -> None:
        self.quota = quota or FakeQuota()
        self.store = FakeStore()
        self.prompts = prompts or FakePrompts()
        self.inflight = Inflight()
        self.metrics = GatewayMetrics("test-admission", lambda: 0, lambda: len(self.inflight))
        self.load = Load(0)
        ids = iter(f"req_{i}" for i in range(1, 100))
        self.admission = Admission(
            gateway_id="gw-0",
            policy=POLICY,
            load=lambda: self.load,
            quota=self.quota,
            store=self.store,
            prompts=self.prompts,
            next_route=lambda: ROUTE,
            inflight=self.inflight,
            metrics=self.metrics,
            clock_ns=lambda: AT_NS,
            new_id=lambda: next(ids),
        )

    def untouched(self) -> bool:
        """Nothing of a refused or rolled-back submit is left anywhere."""
        return (
            not self.store.meta
            and not self.store.idempotency
            and not len(self.inflight)
            and all(rid in {r for _, r, _, _ in self.quota.released} for rid in self.quota.reserved)
        )


async def test_accepted_submit_reserves_records_follows_then_writes() -> None:
    w, f = World(), FakeFollower()
    admitted = await w.admission.submit(PRINCIPAL, req(max_tokens=500), f)
    assert admitted == Admitted("req_1", 100, "tier", submitted_ms=AT_NS // 1_000_000)
    assert w.quota.reserved == {"req_1": 111}
    assert w.store.meta["req_1"] == RequestMeta("req_1", "t1", ROUTE, AT_NS // 1_000_000, "gw-0")
    assert w.store.watchers["req_1"] == {f.watcher}
    assert f.followed == [admitted] and not f.unfollowed
    assert "req_1" in w.inflight.running
    (ev,) = w.prompts.written
    assert ev.submitted.reply.partition == ROUTE.partition and ev.submitted.max_tokens == 100
    assert w.metrics.submits["accepted"] == 1


async def test_model_refusal_does_no_io_and_counts() -> None:
    w, f = World(), FakeFollower()
    w.admission.models = lambda _model: ModelView(True)
    with pytest.raises(GatewayError) as refused:
        await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    assert refused.value.code == errors.MODEL_NOT_FOUND
    assert w.untouched() and not w.quota.reserved and not f.followed
    assert w.metrics.submits["model"] == 1


async def test_the_front_ends_context_and_background_are_recorded() -> None:
    w, f = World(), FakeFollower()
    admitted = await w.admission.submit(
        PRINCIPAL,
        req(max_tokens=None, background=True),
        f,
        context=lambda a: f"{a.request_id}/{a.max_tokens}",
    )
    meta = w.store.meta[admitted.request_id]
    assert (meta.context, meta.background) == ("req_1/100", True)
    assert RequestMeta.parse(meta.request_id, {k: str(v) for k, v in meta.mapping().items()}) == (
        meta
    )


async def test_idempotent_resubmit_answers_with_the_holder_and_reserves_nothing() -> None:
    w = World()
    first = await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), FakeFollower())
    f = FakeFollower()
    again = await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    assert again == Admitted(first.request_id, 0, existing=True, seq_start=0)
    assert list(w.quota.reserved) == [first.request_id] and len(w.prompts.written) == 1
    assert not f.followed  # the caller follows it like a resume
    assert w.metrics.submits["idempotent"] == 1
    # Another tenant's key of the same text is its own.
    other = Principal("t2", "k2", LIMITS)
    assert not (await w.admission.submit(other, req(idempotency_key="k"), f)).existing


async def test_quota_refusal_releases_the_idempotency_key_and_touches_nothing_else() -> None:
    w, f = World(FakeQuota(refuse="tokens_per_day")), FakeFollower()
    with pytest.raises(GatewayError) as refused:
        await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    err = refused.value
    assert (err.code, err.reason, err.retry_after_ms) == ("quota_exceeded", "tokens_per_day", 1234)
    assert err.message == "quota exceeded: tokens_per_day"
    assert w.untouched() and not f.followed and not w.prompts.written
    assert w.metrics.submits["quota"] == 1 and w.metrics.quota_refusals["tokens_per_day"] == 1


async def test_gate_refusal_does_no_io() -> None:
    w, f = World(), FakeFollower()
    w.load = Load(0, draining=True)
    with pytest.raises(GatewayError):
        await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    assert w.untouched() and not w.quota.reserved and not f.followed
    assert w.metrics.submits["draining"] == 1


async def test_prompt_write_failure_rolls_back_every_step() -> None:
    w, f = World(prompts=FakePrompts(fail=True)), FakeFollower()
    with pytest.raises(GatewayError) as failed:
        await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    err = failed.value
    assert (err.code, err.request_id, err.retry_after_ms) == ("internal", "req_1", 1000)
    assert err.message == "could not queue the request"
    assert w.quota.released == [("t1", "req_1", AT_NS // 1_000_000, 61)]
    assert f.unfollowed == ["req_1"] and w.untouched()
    assert w.metrics.submits["failed"] == 1 and w.metrics.submits["accepted"] == 0


async def test_a_failing_step_rolls_back_the_earlier_ones_and_propagates() -> None:
    w, f = World(), FakeFollower()
    w.store.fail_record = True
    with pytest.raises(ConnectionError):
        await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    assert [r for _, r, _, _ in w.quota.released] == ["req_1"]
    assert not f.followed and not f.unfollowed and w.untouched()


async def test_rollback_goes_on_when_one_undo_fails() -> None:
    w, f = World(prompts=FakePrompts(fail=True)), FakeFollower()
    w.quota.fail_release = True
    with pytest.raises(GatewayError):
        await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    # The reservation could not be released (the reaper takes it back); the rest was undone.
    assert not w.store.meta and not w.store.idempotency and f.unfollowed == ["req_1"]


def test_undo_after_takes_back_everything_unless_the_prompt_may_be_written() -> None:
    every = Steps(claimed=True, reserved=True, recorded=True, followed=True)
    assert undo_after(every, ConnectionError()) == Undo(True, True, True, True)
    # Refused before the producer took it, or rejected deterministically: surely not written.
    every.write = SendAttempt(handed_over=False)
    assert undo_after(every, TimeoutError()) == Undo(True, True, True, True)
    every.write = SendAttempt(handed_over=True)
    assert undo_after(every, MessageSizeTooLargeError()) == Undo(True, True, True, True)
    # Taken, then no acknowledgement (a timeout, a broker gone, the task cancelled): it may run.
    for exc in (TimeoutError(), KafkaConnectionError(), asyncio.CancelledError()):
        assert undo_after(every, exc) == Undo(unfollow=True, outcome_unknown=True)
    # A failure before the reservation takes back only the key.
    assert undo_after(Steps(claimed=True), ConnectionError()) == Undo(release_idempotency=True)


async def test_unknown_write_outcome_keeps_the_reservation_record_and_key() -> None:
    w, f = World(prompts=FakePrompts(time_out=True)), FakeFollower()
    with pytest.raises(GatewayError) as unknown:
        await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    err = unknown.value
    assert (err.code, err.reason, err.request_id, err.retry_after_ms) == (
        "internal",
        "outcome_unknown",
        "req_1",
        1000,
    )
    assert err.message.startswith("outcome unknown: Kafka did not confirm the request in time")
    assert "retry with the same idempotency key" in err.message
    assert not w.quota.released and w.quota.reserved == {"req_1": 61}
    assert "req_1" in w.store.meta and w.store.idempotency == {("t1", "k"): "req_1"}
    assert f.unfollowed == ["req_1"] and "req_1" in w.inflight.running
    assert w.metrics.submits["unknown"] == 1
    assert w.metrics.submits["accepted"] == w.metrics.submits["failed"] == 0
    # The retry with the same key is answered with the same request, nothing reserved again.
    w.prompts.time_out = False
    again = await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), FakeFollower())
    assert again == Admitted("req_1", 0, existing=True)
    assert list(w.quota.reserved) == ["req_1"] and len(w.prompts.written) == 1


async def test_a_key_whose_holder_has_no_record_passes_to_the_next_submit() -> None:
    w, f = World(), FakeFollower()
    w.store.idempotency[("t1", "k")] = "req_lost"  # its submit failed with Redis down
    admitted = await w.admission.submit(PRINCIPAL, req(idempotency_key="k"), f)
    assert admitted.request_id == "req_1" and not admitted.existing
    assert w.store.idempotency == {("t1", "k"): "req_1"}
