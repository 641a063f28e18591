"""The public gRPC servicer (ModelService): the thin async shell around the registry and
``Generation``. The admin RPC is in ``admin.py``, on its own port.

Status codes: INVALID_ARGUMENT (field named), NOT_FOUND (unknown model), RESOURCE_EXHAUSTED
(queue full or no slot within the queue timeout), UNAVAILABLE (draining, model loading or
unhealthy), INTERNAL (engine failure: sent after the final message). A rejected call gets
no message; a call that started gets exactly one ``finish`` as its last message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from opentelemetry.context import Context

from llmstream import telemetry, tracing
from llmstream.tracing import Span, SpanKind, Status, StatusCode
from llmstream.v1 import (
    common_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
)
from model_server.errors import (
    InvalidArgument,
    ModelServerError,
    Overloaded,
    Unavailable,
)
from model_server.generation import Delta, Finished, Generation
from model_server.metrics import ServerMetrics
from model_server.registry import ModelHandle, ModelRegistry, ModelState
from model_server.types import Finish, TokenLogprobs
from model_server.validation import parse_prompt, parse_start, prepare, tokenize_prompt
from model_server.worker_watch import Roster, Watcher

log = logging.getLogger(__name__)

FINISH_REASONS: dict[Finish, int] = {
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
    Finish.TIMEOUT: common_pb2.FINISH_REASON_TIMEOUT,
}


@dataclass
class ServerState:
    """Flags shared by the servicers and the server wiring."""

    draining: bool = False
    # Longest wait for the first (start) message of a Generate stream.
    start_timeout_s: float = 10.0


def status_code(err: ModelServerError) -> grpc.StatusCode:
    code: grpc.StatusCode = getattr(grpc.StatusCode, err.code)
    return code


def model_info(handle: ModelHandle) -> model_service_pb2.ModelInfo:
    return model_service_pb2.ModelInfo(
        name=handle.name,
        version=handle.version,
        engine=handle.spec.engine,
        max_context=handle.max_context,
        max_tokens=handle.limits.max_tokens,
        max_concurrency=handle.max_concurrency,
    )


def _logprobs_pb(lps: list[TokenLogprobs]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in lps
    ]


def delta_message(d: Delta) -> model_service_pb2.GenerateResponse:
    delta = model_service_pb2.GenerateDelta(seq=d.seq, text=d.text, token_ids=d.token_ids)
    if d.logprobs:
        delta.logprobs.extend(_logprobs_pb(d.logprobs))
    return model_service_pb2.GenerateResponse(delta=delta)


def finish_message(f: Finished) -> model_service_pb2.GenerateResponse:
    return model_service_pb2.GenerateResponse(
        finish=model_service_pb2.GenerateFinish(
            finish_reason=FINISH_REASONS[f.reason],  # type: ignore[arg-type]
            usage=common_pb2.Usage(
                prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens
            ),
            timings=common_pb2.Timings(
                queue_us=f.queue_us,
                time_to_first_token_us=f.time_to_first_token_us,
                total_us=f.total_us,
            ),
            message=f.message,
            last_seq=f.last_seq,
        )
    )


QUIET_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})


def remote_trace_context(context: grpc.aio.ServicerContext[Any, Any]) -> Context | None:
    """The caller's span as a remote parent, from W3C trace context in the call's metadata."""
    found = {
        key: value
        for key, value in context.invocation_metadata() or ()
        if key in ("traceparent", "tracestate") and isinstance(value, str)
    }
    return tracing.context_of(found.get("traceparent", ""), found.get("tracestate", ""))


def log_finished(gen: Generation, handle: ModelHandle) -> None:
    fin = gen.finished
    if fin is None:
        return
    log.info(
        "generate finished: %s",
        fin.reason.value,
        extra=telemetry.fields(
            model=handle.name,
            version=handle.version,
            finish_reason=fin.reason.value,
            prompt_tokens=fin.prompt_tokens,
            completion_tokens=fin.completion_tokens,
            continuation_tokens=len(gen.req.continuation_token_ids),
            queue_ms=fin.queue_us / 1000,
            ttft_ms=fin.time_to_first_token_us / 1000,
            total_ms=fin.total_us / 1000,
            message=fin.message,
        ),
    )


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics, state: ServerState) -> None:
        self.registry = registry
        self.metrics = metrics
        self.state = state
        self.roster = Roster()

    async def _reject(
        self, context: grpc.aio.ServicerContext[Any, Any], err: ModelServerError, model: str
    ) -> NoReturn:
        # The label is the client's choice: only a model this server has (current, loading or
        # retiring) keeps its name, anything else is `other` (a bounded label set).
        served = any(h.name == model for h in self.registry.handles())
        self.metrics.rejected.add(1, {"code": err.code, "model_name": model if served else "other"})
        # Overload and draining are counted by the metric; logging each would flood the log.
        level = logging.DEBUG if err.code in QUIET_CODES else logging.INFO
        log.log(level, "generate rejected: %s %s", err.code, err)
        await context.abort(status_code(err), str(err))
        raise AssertionError("unreachable")  # context.abort raises

    async def Generate(  # type: ignore[override]  # writes with context.write()
        self,
        request_iterator: Any,
        context: grpc.aio.ServicerContext[
            model_service_pb2.GenerateRequest, model_service_pb2.GenerateResponse
        ],
    ) -> None:
        # The server span continues the worker's trace (W3C traceparent in the metadata).
        with tracing.tracer().start_as_current_span(
            tracing.GENERATE_METHOD,
            context=remote_trace_context(context),
            kind=SpanKind.SERVER,
            attributes=tracing.grpc_attributes(),
            record_exception=False,  # an abort is a status, set below; not an exception
            set_status_on_exception=False,
        ) as span:
            try:
                await self._generate(context, span)
            except BaseException:
                code = context.code()  # set by abort(); None when the call was cancelled
                if code is not None and code != grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                raise
            span.set_attribute("rpc.grpc.status_code", 0)

    async def _generate(
        self,
        context: grpc.aio.ServicerContext[
            model_service_pb2.GenerateRequest, model_service_pb2.GenerateResponse
        ],
        span: Span,
    ) -> None:
        try:
            first = await asyncio.wait_for(context.read(), self.state.start_timeout_s)
        except TimeoutError:
            err = InvalidArgument(
                "start", f"no start message within {self.state.start_timeout_s:g}s"
            )
            await self._reject(context, err, "")
        if first is grpc.aio.EOF:
            await self._reject(
                context, InvalidArgument("start", "stream closed before a start message"), ""
            )
        assert isinstance(first, model_service_pb2.GenerateRequest)
        if first.WhichOneof("kind") != "start":
            await self._reject(
                context, InvalidArgument("start", "the first message must be `start`"), ""
            )
        start = first.start
        model = start.model
        try:
            if self.state.draining:
                raise Unavailable("the server is draining; retry on another replica")
            if not model:
                raise InvalidArgument("start.model", "must not be empty")
            handle = self.registry.get(model)
            parsed = parse_start(start, handle.limits)
            handle.admit()
        except ModelServerError as err:
            await self._reject(context, err, model)
        try:
            prepared = await prepare(parsed, handle)
        except ModelServerError as err:
            handle.release()
            await self._reject(context, err, model)
        except BaseException:
            handle.release()
            raise

        gen = Generation(
            handle.engine,
            prepared.request,
            model_name=handle.name,
            metrics=self.metrics,
            request_timeout_s=handle.limits.request_timeout_s,
            length_message=prepared.length_message,
        )
        handle.generations.add(gen)
        protocol_error: list[str] = []
        reader = asyncio.create_task(self._read_control(context, gen, protocol_error))
        overloaded: Overloaded | None = None
        span.set_attributes({"llmstream.request_id": parsed.request_id, "llmstream.model": model})
        first_token = True
        with telemetry.log_context(request_id=parsed.request_id):
            try:
                async with contextlib.aclosing(gen.run()) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            if first_token:
                                first_token = False
                                span.add_event("first_token")
                            await context.write(delta_message(event))
                        else:
                            span.add_event(
                                "finish",
                                {
                                    "llmstream.finish_reason": event.reason.value,
                                    "llmstream.completion_tokens": event.completion_tokens,
                                    "llmstream.queue_us": event.queue_us,
                                },
                            )
                            await context.write(finish_message(event))
            except Overloaded as err:
                overloaded = err
            finally:
                reader.cancel()
                handle.generations.discard(gen)
                handle.release()
                log_finished(gen, handle)
        if overloaded is not None:
            await self._reject(context, overloaded, model)
        fin = gen.finished
        if fin is not None and fin.reason is Finish.ERROR:
            await context.abort(grpc.StatusCode.INTERNAL, fin.message or "engine failure")
        if protocol_error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, protocol_error[0])

    async def _read_control(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        gen: Generation,
        protocol_error: list[str],
    ) -> None:
        """Reads the client's further messages: `cancel` aborts; half-close does not."""
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("kind")
                if kind == "cancel":
                    gen.cancel(msg.cancel.reason or "client")
                    return
                if kind == "start":
                    protocol_error.append("start: sent twice on one stream")
                    gen.cancel("protocol error: a second start message")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the RPC ended; the main task handles that
            log.debug("control stream ended: %r", exc)

    async def WatchWorkers(  # type: ignore[override]  # writes with context.write()
        self,
        request_iterator: Any,
        context: grpc.aio.ServicerContext[
            model_service_pb2.WatchWorkersRequest, model_service_pb2.WatchWorkersResponse
        ],
    ) -> None:
        """Until the worker's stream ends: after a message with `leaving`, a departure; else a
        loss, told to the other watchers of its group (worker/liveness.py evicts the dead
        member)."""
        watcher = self.roster.attach()
        # The worker counts its watch as established once these arrive (no message may come
        # for a long time).
        await context.send_initial_metadata(())
        sender = asyncio.create_task(self._send_notices(context, watcher))
        leaving = False
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    # A dead client's stream ends like this too (then the call is cancelled):
                    # only a message with `leaving` before it makes it a departure.
                    return
                watcher.presence.CopyFrom(msg.presence)
                leaving = msg.leaving
        finally:
            sender.cancel()
            if leaving or self.state.draining:
                # This server stopping cancels every watch: that says nothing about the workers.
                self.roster.left(watcher)
                if leaving:
                    log.info(
                        "worker watch ended: the worker left",
                        extra=telemetry.fields(
                            worker_id=watcher.presence.worker_id,
                            member_id=watcher.presence.member_id,
                        ),
                    )
            else:
                told = self.roster.lost(watcher)
                log.info(
                    "worker watch broke: worker presumed dead",
                    extra=telemetry.fields(
                        worker_id=watcher.presence.worker_id,
                        member_id=watcher.presence.member_id,
                        group=watcher.presence.group,
                        told=told,
                    ),
                )

    @staticmethod
    async def _send_notices(context: grpc.aio.ServicerContext[Any, Any], watcher: Watcher) -> None:
        with contextlib.suppress(Exception):  # the RPC ended; the reading side handles that
            while True:
                await context.write(await watcher.outbox.get())

    async def ListModels(
        self,
        request: model_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> model_service_pb2.ListModelsResponse:
        return model_service_pb2.ListModelsResponse(
            models=[model_info(h) for h in self.registry.current() if h.state is ModelState.READY]
        )

    async def Tokenize(
        self,
        request: model_service_pb2.TokenizeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> model_service_pb2.TokenizeResponse:
        try:
            if not request.model:
                raise InvalidArgument("model", "must not be empty")
            handle = self.registry.get(request.model)
            prompt = parse_prompt(request.prompt, "prompt", handle.limits)
            ids = await tokenize_prompt(handle, prompt, "prompt")
        except ModelServerError as err:
            await context.abort(status_code(err), str(err))
        return model_service_pb2.TokenizeResponse(token_ids=ids)
