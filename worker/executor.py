"""One request on this worker: the async shell around `attempt` (one stream) and `policy`
(retry or finish). It moves bytes between the gRPC call and the emitter, waits (backoff,
cancel grace) and traces; the decisions are theirs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from aiokafka.errors import KafkaError

from llmstream import fold, telemetry, tracing
from llmstream.tracing import Span, SpanKind, Status, StatusCode
from llmstream.v1 import model_service_pb2
from worker import policy
from worker.attempt import Attempt, AttemptOutcome, generate_start
from worker.cancels import CancelLookahead
from worker.core import Envelope, envelope_of
from worker.emitter import Emitter, Producer
from worker.filters import Blocklist
from worker.lease import ProduceGate
from worker.metrics import WorkerMetrics
from worker.models import ModelServers
from worker.partitions import Partitions
from worker.routing import Router, backoff_s, prefix_key
from worker.run import Run
from worker.settings import Settings

log = logging.getLogger("worker")


class Executor:
    def __init__(
        self,
        settings: Settings,
        producer: Producer,
        models: ModelServers,
        partitions: Partitions,
        lookahead: CancelLookahead,
        metrics: WorkerMetrics,
        on_fatal: Callable[[BaseException], None],
        gate: ProduceGate,
    ) -> None:
        self.settings = settings
        self._gate = gate
        self._producer = producer
        self._models = models
        self._partitions = partitions
        self._lookahead = lookahead
        self._metrics = metrics
        self._on_fatal = on_fatal
        self.router = Router(settings.model_servers)
        self._blocklist = Blocklist.parse(settings.blocklist)

    async def execute(self, run: Run) -> None:
        """The run's task. Ends with its terminal event acknowledged, or abandoned (cancelled
        by the worker), or the worker told to stop (a produce failed for good)."""
        submit = run.submit
        with (
            self._process_span(run),
            telemetry.log_context(request_id=run.request_id, tenant_id=submit.tenant_id),
        ):
            try:
                await self._serve(run)
            except asyncio.CancelledError:
                if not run.abandoned:
                    raise
            except KafkaError as exc:
                # An event may be missing from the log: nothing this worker produces for the
                # request can be trusted any more. Stop the worker (exit 1) and let the next
                # owner continue from what the log really holds.
                log.error(
                    "producing failed; stopping the worker", extra=telemetry.fields(error=repr(exc))
                )
                self._on_fatal(exc)
            except Exception as exc:
                log.exception("request crashed")
                await self._crashed(run, exc)
            finally:
                if run.emitter is not None:
                    run.emitter.close()

    async def _serve(self, run: Run) -> None:
        prior = run.prior
        if prior is not None and prior.terminal:
            self._metrics.requests.add(1, {"outcome": "skipped_terminal"})
            self._partitions.finish(run)
            return
        em = run.emitter = self._emitter(run, self._traced(run))
        if prior is not None and (prior.attempts or prior.last_seq):
            self._metrics.takeovers.add(1)
        await self._lookahead.caught_up(run)
        estimate = run.submit.submitted.estimated_prompt_tokens
        if run.cancel_reason is not None:
            terminal = policy.cancelled_before_start(run.cancel_reason, estimate)
        else:
            terminal = await self._attempts(run, em)
        await self._terminal(run, em, terminal)

    def _emitter(self, run: Run, env: Envelope) -> Emitter:
        s = self.settings
        reply = run.submit.submitted.reply
        prior = run.prior
        return Emitter(
            self._producer,
            reply.topic or s.tokens_topic,
            reply.partition,
            env,
            gate=self._gate,
            coalesce_s=s.coalesce_ms / 1000.0,
            coalesce_bytes=s.coalesce_bytes,
            last_seq=prior.last_seq if prior else 0,
            token_ids=prior.token_ids if prior else (),
        )

    async def _attempts(self, run: Run, em: Emitter) -> policy.Terminal:
        """Streams until one ends the request; between them, `policy` decides."""
        s = self.settings
        limits = policy.limits(
            run.submit,
            default_timeout_ms=s.default_timeout_ms,
            max_tokens_cap=s.max_tokens,
            now_ms=time.time_ns() // 1_000_000,
        )
        deadline = time.monotonic() + limits.remaining_s
        estimate = run.submit.submitted.estimated_prompt_tokens
        attempts = run.prior.attempts if run.prior else 0
        retries = 0
        exclude: set[str] = set()
        affinity = prefix_key(run.submit.submitted.model, run.submit.submitted.prompt)
        while True:
            replica = self.router.pick(time.monotonic(), exclude, affinity)
            self.router.acquire(replica)
            try:
                outcome = await self._attempt(run, em, replica, attempts, limits, deadline)
            finally:
                self.router.release(replica)
            attempts = outcome.attempt
            await em.flush()
            if policy.retryable_error(outcome) is None:
                self.router.succeeded(replica)
            else:
                self.router.failed(replica, time.monotonic())
                exclude = {replica}
            step = policy.decide(
                outcome, retries=retries, max_retries=s.retries, prompt_tokens=estimate
            )
            if isinstance(step, policy.Terminal):
                return step
            retries = step.retry
            await self._backoff(run, replica, step)
            stop = policy.stopped_during_backoff(
                run.cancel_reason, time.monotonic() >= deadline, estimate
            )
            if stop is not None:
                return stop

    async def _backoff(self, run: Run, replica: str, retry: policy.Retry) -> None:
        """Wait before the retry; a cancel cuts the wait short."""
        s = self.settings
        self._metrics.retries.add(1)
        delay = backoff_s(retry.retry, s.backoff_base_ms / 1000, s.backoff_cap_ms / 1000)
        log.info(
            "model server unavailable; retrying",
            extra=telemetry.fields(
                replica=replica, retry=retry.retry, delay_s=round(delay, 3), code=retry.code.name
            ),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.cancelled.wait(), delay)

    async def _attempt(
        self,
        run: Run,
        em: Emitter,
        replica: str,
        attempts: int,
        limits: policy.Limits,
        deadline: float,
    ) -> AttemptOutcome:
        """One Generate stream, fed to an `Attempt`. A stop it decides, a cancel or the wall
        time wakes the stopper, which asks the server to stop and cuts the call after a grace
        period."""
        machine = Attempt(
            attempts_before=attempts,
            tokens_before=em.tokens,
            max_tokens=limits.max_tokens,
            blocklist=self._blocklist,
        )
        # The model server continues the trace from this client span (gRPC metadata).
        rpc_span = tracing.tracer().start_span(
            tracing.GENERATE_METHOD,
            kind=SpanKind.CLIENT,
            attributes={**tracing.grpc_attributes(replica), "llmstream.attempt": attempts + 1},
        )
        call = self._models.stub(replica).Generate(metadata=self._metadata(rpc_span))
        stop_now = asyncio.Event()
        stopper = asyncio.create_task(self._stopper(run, call, machine, deadline, stop_now))
        try:
            start = generate_start(run.submit, limits.max_tokens, em.token_ids)
            await call.write(model_service_pb2.GenerateRequest(start=start))
            await self._read(run, em, replica, call, machine, stop_now)
        except grpc.aio.AioRpcError as exc:
            machine.on_error(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from read() when the stopper cut the call after
            # the grace period; a cancellation of this task itself must propagate.
            task = asyncio.current_task()
            if not machine.stopping or (task is not None and task.cancelling()):
                raise
        finally:
            stopper.cancel()
            call.cancel()
            _end_rpc_span(rpc_span, machine.outcome)
        return machine.outcome

    def _metadata(self, rpc_span: Span) -> tuple[tuple[str, str], ...]:
        traceparent, tracestate = tracing.trace_context_of(rpc_span)
        metadata = [("x-llmstream-worker", self.settings.worker_id), ("traceparent", traceparent)]
        if tracestate:
            metadata.append(("tracestate", tracestate))
        return tuple(metadata)

    async def _read(
        self,
        run: Run,
        em: Emitter,
        replica: str,
        call: Any,
        machine: Attempt,
        stop_now: asyncio.Event,
    ) -> None:
        while not machine.ended:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                machine.on_end(await call.code(), await call.details() or "")
                return
            step = machine.on_message(msg)
            if step.started is not None:
                version = await self._models.version(replica, run.submit.submitted.model)
                await em.begin_attempt(step.started)
                started = em.env.started(
                    self.settings.worker_id, replica, version, step.started, em.last_seq
                )
                await em.send(started, gates=False)
            if step.cancel:
                stop_now.set()
            if step.emit is not None:
                if not em.deltas_in and run.tokens_span is not None:
                    run.tokens_span.add_event("first_token", {"llmstream.seq": em.last_seq + 1})
                await em.push(step.emit.text, step.emit.token_ids)

    async def _stopper(
        self, run: Run, call: Any, machine: Attempt, deadline: float, stop_now: asyncio.Event
    ) -> None:
        waits = [
            asyncio.ensure_future(run.cancelled.wait()),
            asyncio.ensure_future(stop_now.wait()),
        ]
        try:
            await asyncio.wait(
                waits,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for w in waits:
                w.cancel()
        machine.interrupt(run.cancel_reason)
        with contextlib.suppress(Exception):
            cancel = model_service_pb2.GenerateCancel(reason=machine.outcome.own_message)
            await call.write(model_service_pb2.GenerateRequest(cancel=cancel))
        await asyncio.sleep(self.settings.cancel_grace_s)
        call.cancel()

    async def _terminal(self, run: Run, em: Emitter, terminal: policy.Terminal) -> None:
        event = terminal.event(em.env, em.usage(terminal.prompt_tokens), em.last_seq)
        sent_at = time.monotonic()
        await em.send(event)
        await em.settle()
        m = self._metrics
        m.produce_latency.record(time.monotonic() - sent_at)
        if run.tokens_span is not None:
            body = event.WhichOneof("body") or ""
            run.tokens_span.add_event(
                "finish",
                {
                    "llmstream.outcome": body,
                    "llmstream.last_seq": em.last_seq,
                    "llmstream.events": em.events,
                },
            )
            if body == "failed":
                run.tokens_span.set_status(Status(StatusCode.ERROR, event.failed.code))
        m.requests.add(1, {"outcome": fold.outcome(event)})
        m.tokens.add(len(em.token_ids) - em.first_token_count)
        m.token_events.add(em.last_seq - em.first_seq)
        m.model_deltas.add(em.deltas_in)
        self._partitions.finish(run)

    async def _crashed(self, run: Run, exc: Exception) -> None:
        """A bug: end the request with `failed` internal rather than block its partition."""
        em = run.emitter
        if em is None:
            env = envelope_of(run.submit, self.settings.worker_id, run.generation)
            em = run.emitter = self._emitter(run, env)
        try:
            await em.flush()
            estimate = run.submit.submitted.estimated_prompt_tokens
            await self._terminal(run, em, policy.crashed(exc, estimate))
        except Exception:
            log.exception("could not report the crash; request left uncommitted")
            self._partitions.drop(run)

    @contextlib.contextmanager
    def _process_span(self, run: Run) -> Iterator[None]:
        """The worker's span of one request, continuing the trace the prompt event carries."""
        submit = run.submit
        parent = tracing.context_of(submit.trace.traceparent, submit.trace.tracestate)
        with tracing.tracer().start_as_current_span(
            f"process {run.tp.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=tracing.kafka_attributes(
                "process",
                run.tp.topic,
                partition=run.tp.partition,
                key=run.request_id,
                offset=run.offset,
                group=self.settings.group,
            ),
        ):
            try:
                yield
            finally:
                if run.tokens_span is not None:
                    run.tokens_span.end()

    def _traced(self, run: Run) -> Envelope:
        """Starts the span of this worker's token events; every event it produces for the
        request carries that span's context (the gateway and aggregator continue from it)."""
        reply = run.submit.submitted.reply
        topic = reply.topic or self.settings.tokens_topic
        span = tracing.tracer().start_span(
            f"send {topic}",
            kind=SpanKind.PRODUCER,
            attributes=tracing.kafka_attributes(
                "send", topic, partition=reply.partition, key=run.request_id
            ),
        )
        run.tokens_span = span
        traceparent, tracestate = tracing.trace_context_of(span)
        env = envelope_of(run.submit, self.settings.worker_id, run.generation)
        return dataclasses.replace(env, traceparent=traceparent, tracestate=tracestate)


def _end_rpc_span(span: Span, outcome: AttemptOutcome) -> None:
    status = outcome.grpc_status
    if outcome.error is not None:
        span.set_status(Status(StatusCode.ERROR, status.name))
    span.set_attribute("rpc.grpc.status_code", status.value[0])
    span.end()
