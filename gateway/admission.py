"""Admission: may a submit run, with which limits, and which event starts it.

Shaped like TGI's router (`Infer` composing `Validation` and a backend): one protocol-neutral
façade, `Admission.submit(principal, SubmitRequest, follower) -> Admitted`, called by every
front end (the WebSocket now, the OpenAI-compatible HTTP/SSE routes next); it raises a
`GatewayError` for every refusal, which each front end renders in its own wire format.

- The pure core decides from data, before any I/O: `plan_submit` gates (draining, overloaded),
  caps `max_tokens` (tier, then load shedding), estimates the prompt and sizes the quota
  reservation; `submitted_event` builds the event that starts the request.
- The shell (`Admission`) executes a plan step by step — claim the idempotency key (or answer
  with the request that holds it), reserve the quota, record the request, let the front end
  follow it, write the prompt — and when a step refuses or fails, `undo_after` (pure) says
  what to take back: every step done, unless the prompt may have been written after all (then
  the reservation, the record and the idempotency key stay and the client is told the outcome
  is unknown: `errors.outcome_unknown`).

Protocol parsing (field types and bounds) stays with each front end (gateway/protocol.py for
the WebSocket); what is decided here is the same for all of them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace

from gateway import errors
from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.inflight import Inflight
from gateway.metrics import GatewayMetrics
from gateway.prompts import PromptWriter, SendAttempt, surely_not_written
from gateway.quota import Limits, Quota
from gateway.settings import Settings
from gateway.store import ReplyRoute, RequestMeta, RequestStore
from llmstream import codec, telemetry, tracing
from llmstream.tracing import SpanKind
from llmstream.v1 import events_pb2

log = logging.getLogger("gateway")


# ---- input and output -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class SubmitRequest:
    """A request to generate, whatever protocol it came in (already parsed and bounded)."""

    model: str
    max_tokens: int | None  # None: the most the model (else the tier) allows
    prompt: str | None = None  # exactly one of prompt or messages
    messages: tuple[ChatMessage, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    idempotency_key: str | None = None
    # A max_tokens above the model's limit is capped (the WebSocket says so in `accepted`), or
    # refused naming the field (OpenAI's HTTP API answers 400 there).
    refuse_over_model_limit: bool = False
    # Keep running when nobody follows it: no disconnect grace period ends it (background
    # responses of the OpenAI API).
    background: bool = False

    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.content) + len(m.role) for m in self.messages)


@dataclass(frozen=True)
class Admitted:
    """An admitted submit. Its events are seq `seq_start + 1 ...` then a terminal event."""

    request_id: str
    max_tokens: int  # effective (0 when `existing`)
    capped: str | None = None  # "model", "tier" or "load": why max_tokens is below the request's
    # An idempotent resubmit: the request that holds the key, which the caller follows like a
    # resume from seq_start (nothing new was reserved or written).
    existing: bool = False
    seq_start: int = 0
    submitted_ms: int = 0


class Follower(Protocol):
    """The front end's side of a submit: it starts following the request before the prompt is
    written (so no event can be missed), and stops if the prompt could not be written."""

    @property
    def watcher(self) -> str:
        """Its member of the request's watchers set: "<gateway id>/<socket or stream id>"."""
        ...

    def follow(self, admitted: Admitted) -> None: ...

    def unfollow(self, request_id: str) -> None: ...


# ---- the pure core ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """This replica's admission bounds (LLMSTREAM_GATEWAY_MAX_INFLIGHT, _MAX_PROMPT_LAG,
    _SHED_MAX_TOKENS; 0 turns the last two off)."""

    max_inflight: int
    max_prompt_lag: int = 0
    shed_max_tokens: int = 0

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(s.max_inflight, s.max_prompt_lag, s.shed_max_tokens)


@dataclass(frozen=True)
class Load:
    """What the replica carries when a submit arrives."""

    inflight: int
    prompt_lag: int = 0
    draining: bool = False

    def overloaded(self, p: Policy) -> bool:
        lag = p.max_prompt_lag
        return self.inflight >= p.max_inflight or (lag > 0 and self.prompt_lag >= lag)

    def shedding(self, p: Policy) -> bool:
        """From half of either bound on, new requests get at most `shed_max_tokens`."""
        lag = p.max_prompt_lag
        return self.inflight * 2 >= p.max_inflight or (lag > 0 and self.prompt_lag * 2 >= lag)


def estimate_prompt_tokens(req: SubmitRequest) -> int:
    """Quota estimate of prompt tokens before tokenization: ~4 characters per token (+4 per
    chat message for the template). The terminal event's usage replaces it on settlement."""
    return req.prompt_chars() // 4 + 1 + 4 * len(req.messages)


@dataclass(frozen=True)
class ModelView:
    """What this replica's model catalog (gateway/models.py) says of a requested model.

    The catalog decides only when `checked`: once it has been read to its end and lists at
    least one served model. Before that (a gateway starting, workers that announce nothing yet)
    a request goes through unchecked and the worker answers as it always did (`failed`
    `model_not_found`): refusing everything while the catalog is unknown would turn a slow
    catalog read into an outage."""

    checked: bool
    served: bool = False  # announced within its expiry
    known: bool = False  # announced once: a model not served now is unavailable, not unknown
    limit: int = 0  # the most max_tokens it takes (0: unknown)
    retry_after_ms: int = 0  # unavailable: when a replica may have announced it again


UNCHECKED = ModelView(checked=False)


def model_limit(model: str, view: ModelView) -> int:
    """The model's bound on max_tokens (0: none known), or `GatewayError` `model_not_found`
    (never served) / `model_unavailable` (served before, no replica announces it now)."""
    if not view.checked or view.served:
        return view.limit
    if view.known:
        raise errors.model_unavailable(model, view.retry_after_ms)
    raise errors.model_not_found(model)


def cap_max_tokens(
    requested: int | None,
    limits: Limits,
    load: Load,
    policy: Policy,
    model_max: int = 0,
    *,
    refuse_over_model: bool = False,
) -> tuple[int, str | None]:
    """The effective max_tokens and why it is lower than requested (None: it is not, or the
    client left it to us: then the model's limit, else the tier's, capped by load).
    `model_max` is the model's limit (0: unknown); above it, `refuse_over_model` refuses the
    request naming `max_tokens` instead of capping."""
    tier = limits.max_tokens_per_request
    max_tokens, capped = requested if requested is not None else model_max or tier, None
    if model_max and max_tokens > model_max:
        if refuse_over_model:
            raise errors.GatewayError(
                errors.INVALID_REQUEST,
                f"max_tokens is too large: {max_tokens}. The model supports at most "
                f"{model_max} completion tokens.",
                field="max_tokens",
                reason="model",
            )
        max_tokens, capped = model_max, "model"
    if max_tokens > tier:
        max_tokens, capped = tier, "tier"
    shed = policy.shed_max_tokens
    if shed and max_tokens > shed and load.shedding(policy):
        max_tokens, capped = shed, "load"
    return max_tokens, capped if requested is not None else None


@dataclass(frozen=True)
class Plan:
    """What a submit will reserve and write, decided before any I/O."""

    request_id: str
    principal: Principal
    max_tokens: int
    capped: str | None
    estimated_prompt_tokens: int
    at_ns: int  # the submitted event's time: it also picks the quota windows
    idempotency_key: str | None

    @property
    def tenant_id(self) -> str:
        return self.principal.tenant_id

    @property
    def reserved_tokens(self) -> int:
        return self.estimated_prompt_tokens + self.max_tokens

    @property
    def at_ms(self) -> int:
        return self.at_ns // 1_000_000


def plan_submit(
    principal: Principal,
    req: SubmitRequest,
    load: Load,
    policy: Policy,
    request_id: str,
    at_ns: int,
    model: ModelView = UNCHECKED,
) -> Plan:
    """Gate, check the model, cap and size a submit; `GatewayError` if the replica takes no new
    requests now (reason `draining` or `overloaded`), for a model not served, or (when the
    request says so) a max_tokens above the model's limit."""
    if load.draining:
        raise errors.draining()
    if load.overloaded(policy):
        raise errors.overloaded()
    max_tokens, capped = cap_max_tokens(
        req.max_tokens,
        principal.limits,
        load,
        policy,
        model_limit(req.model, model),
        refuse_over_model=req.refuse_over_model_limit,
    )
    return Plan(
        request_id=request_id,
        principal=principal,
        max_tokens=max_tokens,
        capped=capped,
        estimated_prompt_tokens=estimate_prompt_tokens(req),
        at_ns=at_ns,
        idempotency_key=req.idempotency_key or None,
    )


def submitted_event(
    plan: Plan, req: SubmitRequest, route: ReplyRoute, gateway_id: str
) -> events_pb2.Event:
    """The `submitted` event that starts the request (its trace context is added when it is
    written)."""
    ev = codec.new_event(plan.request_id, plan.tenant_id, gateway_id)
    ev.event_time.FromNanoseconds(plan.at_ns)
    s = ev.submitted
    s.model = req.model
    if req.prompt is not None:
        s.prompt.text = req.prompt
    else:
        for m in req.messages:
            s.prompt.chat.messages.add(role=m.role, content=m.content)
    if req.temperature is not None:
        s.sampling.temperature = req.temperature
    if req.top_p is not None:
        s.sampling.top_p = req.top_p
    if req.seed is not None:
        s.sampling.seed = req.seed
    s.sampling.stop.extend(req.stop)
    s.max_tokens = plan.max_tokens
    s.reply.topic = route.topic
    s.reply.partition = route.partition
    s.reply.gateway_id = gateway_id
    s.idempotency_key = plan.idempotency_key or ""
    s.estimated_prompt_tokens = plan.estimated_prompt_tokens
    s.reserved_tokens = plan.reserved_tokens
    return ev


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


# ---- the shell --------------------------------------------------------------------------------


@dataclass
class Steps:
    """The steps of a plan executed so far (what a failure must undo)."""

    claimed: bool = False
    reserved: bool = False
    recorded: bool = False
    followed: bool = False
    # The prompt write, once started: did the producer take the record?
    write: SendAttempt | None = None


@dataclass(frozen=True)
class Undo:
    """What a failed submit takes back (`undo_after`)."""

    unfollow: bool = False  # the front end stops following (its stream ends with the error)
    forget_record: bool = False
    release_reservation: bool = False
    release_idempotency: bool = False
    # The prompt may have been written: the request may run, its reservation, record and
    # idempotency key stay, and the client is told so.
    outcome_unknown: bool = False


def undo_after(done: Steps, exc: BaseException) -> Undo:
    """What to undo after the step that raised `exc` (pure). Everything done, unless the prompt
    may have been written after all (handed to the producer, no deterministic rejection): then
    the request may run and be billed, so its reservation (settled by the aggregator, or reaped
    if it never reaches the log), its record (a resume finds it) and its idempotency key (a
    retry follows the same request) stay; only the front end's stream ends."""
    if done.write is not None and not surely_not_written(exc, done.write):
        return Undo(unfollow=done.followed, outcome_unknown=True)
    return Undo(done.followed, done.recorded, done.reserved, done.claimed)


@dataclass(kw_only=True, eq=False)
class Admission:
    gateway_id: str
    policy: Policy
    load: Callable[[], Load]  # what the replica carries now
    quota: Quota
    store: RequestStore
    prompts: PromptWriter
    next_route: Callable[[], ReplyRoute]  # the reply partition of a new request
    inflight: Inflight
    metrics: GatewayMetrics
    # What the model catalog says of a model (gateway/models.py `Models.view`).
    models: Callable[[str], ModelView] = lambda _model: UNCHECKED
    clock_ns: Callable[[], int] = time.time_ns
    new_id: Callable[[], str] = new_request_id

    async def submit(
        self,
        principal: Principal,
        req: SubmitRequest,
        follower: Follower,
        *,
        context: Callable[[Admitted], str] | None = None,
    ) -> Admitted:
        """Admit a submit, or raise `GatewayError`. The root span of the request's trace (one
        per submit, whatever its outcome). `context` is what the front end records with the
        request for rendering it again on a resume (`RequestMeta.context`, opaque here)."""
        with tracing.tracer().start_as_current_span(
            "submit",
            kind=SpanKind.SERVER,
            attributes={"llmstream.tenant_id": principal.tenant_id, "llmstream.model": req.model},
        ):
            try:
                plan = plan_submit(
                    principal,
                    req,
                    self.load(),
                    self.policy,
                    self.new_id(),
                    self.clock_ns(),
                    self.models(req.model),
                )
            except GatewayError as err:
                self.metrics.submits[err.reason] += 1
                raise
            trace.get_current_span().set_attribute("llmstream.request_id", plan.request_id)
            done = Steps()
            # The one path after the first step: whatever raises (a refusal, Redis, Kafka, a
            # cancelled task), exactly what `undo_after` says is taken back.
            try:
                return await self._execute(plan, req, follower, context, done)
            except BaseException as exc:
                undo = undo_after(done, exc)
                await self._undo(plan, undo, follower)
                if undo.outcome_unknown and isinstance(exc, Exception):
                    self.metrics.submits["unknown"] += 1
                    raise errors.outcome_unknown(
                        plan.request_id, bool(plan.idempotency_key)
                    ) from exc
                raise

    async def _claim(self, plan: Plan, done: Steps) -> Admitted | None:
        """Claim the idempotency key; the request that holds it, if another does. A holder
        without a record (its submit failed and could not release the key: Redis failed) is
        stale: the key passes to this submit."""
        assert plan.idempotency_key
        tenant, key = plan.tenant_id, plan.idempotency_key
        holder = await self.store.claim_idempotency(tenant, key, plan.request_id)
        if holder is not None:
            if await self.store.wait_for(tenant, holder) is not None:
                self.metrics.submits["idempotent"] += 1
                return Admitted(holder, 0, existing=True)
            if not await self.store.take_over_idempotency(tenant, key, holder, plan.request_id):
                raise errors.internal("idempotency key in use, retry", request_id=holder)
        done.claimed = True
        return None

    async def _execute(
        self,
        plan: Plan,
        req: SubmitRequest,
        follower: Follower,
        context: Callable[[Admitted], str] | None,
        done: Steps,
    ) -> Admitted:
        if plan.idempotency_key:
            existing = await self._claim(plan, done)
            if existing is not None:
                return existing
        decision = await self.quota.reserve(
            plan.tenant_id,
            plan.request_id,
            plan.at_ms,
            plan.at_ms,
            plan.reserved_tokens,
            plan.principal.limits,
        )
        if not decision.ok:
            self.metrics.submits["quota"] += 1
            self.metrics.quota_refusals[decision.limit or "unknown"] += 1
            raise errors.quota_exceeded(decision.limit, decision.retry_after_ms)
        done.reserved = True
        route = self.next_route()
        admitted = Admitted(plan.request_id, plan.max_tokens, plan.capped, submitted_ms=plan.at_ms)
        meta = RequestMeta(
            plan.request_id,
            plan.tenant_id,
            route,
            plan.at_ms,
            self.gateway_id,
            background=req.background,
            context=context(admitted) if context is not None else "",
        )
        await self.store.record(meta, follower.watcher)
        done.recorded = True
        follower.follow(admitted)
        self.inflight.add(plan.request_id)
        done.followed = True
        done.write = SendAttempt()
        try:
            await self.prompts.submit(
                submitted_event(plan, req, route, self.gateway_id), done.write
            )
        except Exception as exc:
            if not surely_not_written(exc, done.write):  # counted "unknown" by `submit`
                log.warning(
                    "prompt write outcome unknown: reservation kept",
                    extra=telemetry.fields(request_id=plan.request_id, error=repr(exc)),
                )
                raise
            log.exception("producing a prompt failed")
            self.metrics.submits["failed"] += 1
            raise errors.internal(
                "could not queue the request", request_id=plan.request_id
            ) from exc
        self.metrics.submits["accepted"] += 1
        _log_prompt(plan, req)
        return admitted

    async def _undo(self, plan: Plan, undo: Undo, follower: Follower) -> None:
        """Take back what `undo` says, newest first. Every undo is tried even when one fails
        (Redis may be what failed): what cannot be undone is reaped (the reservation: its
        record was written with it) or expires (the stream lease, the idempotency key's TTL; a
        key whose request has no record passes to the next submit with it)."""
        rid = plan.request_id
        if undo.unfollow:
            follower.unfollow(rid)
            if not undo.outcome_unknown:
                self.inflight.discard(rid)
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if undo.forget_record:
            steps.append(("request record", lambda: self.store.forget(rid)))
        if undo.release_reservation:
            steps.append(
                (
                    "quota reservation",
                    lambda: self.quota.release(plan.tenant_id, rid, plan.at_ms),
                )
            )
        if undo.release_idempotency and plan.idempotency_key:
            key = plan.idempotency_key
            steps.append(
                ("idempotency key", lambda: self.store.release_idempotency(plan.tenant_id, key))
            )
        for what, step in steps:
            try:
                await step()
            except Exception:
                log.warning("undoing the %s of a failed submit failed", what, exc_info=True)


def _log_prompt(plan: Plan, req: SubmitRequest) -> None:
    """Prompt text is user data: logged only with LLMSTREAM_LOG_PROMPTS=1."""
    if not telemetry.log_prompts():
        return
    with telemetry.log_context(request_id=plan.request_id, tenant_id=plan.tenant_id):
        log.info(
            "prompt",
            extra=telemetry.fields(
                model=req.model,
                prompt=req.prompt,
                messages=[{"role": m.role, "content": m.content} for m in req.messages],
            ),
        )
