"""One generation from engine steps to protocol events: the pure core of ``Generate``.

``Generation.run()`` yields ``Delta``s (seq 1, 2, ...) and then exactly one ``Finished``.
It owns everything between the engine and the wire that is not gRPC:

- detokenization with UTF-8 hold-back, and stop strings, for every engine (engines give
  token ids; ``Engine.token_bytes`` gives their bytes);
- priming both with the continuation tokens, so a resumed generation streams exactly the
  text an uninterrupted one would have streamed from that point;
- natural batching: one ``Delta`` per engine step, and engines merge what their reader has
  not taken yet (``engine.StepChannel``; vLLM's output collector does the same), so the gRPC
  writer, pulling the next delta when its previous write completed, sends every token produced
  meanwhile in one message, and one token per message when it keeps up; no timer;
- cancellation (``cancel(reason)``, the RPC going away, the request timeout) aborting the
  sequence inside the engine; after a cancel nothing more is streamed;
- usage, timings and metrics.

Usage: ``prompt_tokens`` is the prompt alone; ``completion_tokens`` counts the continuation
tokens plus the new ones, i.e. what an uninterrupted run would report. The new tokens of
this stream are exactly the ``token_ids`` of its deltas (an end-of-sequence token included,
as vLLM does; its text is empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from model_server.engine import Engine
from model_server.errors import EngineError, Overloaded
from model_server.metrics import ServerMetrics
from model_server.types import EngineRequest, Finish, TokenLogprobs
from model_server.utf8 import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delta:
    seq: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class Finished:
    reason: Finish
    prompt_tokens: int
    completion_tokens: int
    queue_us: int
    time_to_first_token_us: int
    total_us: int
    message: str = ""
    last_seq: int = 0


@dataclass(slots=True)
class _Clock:
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    itl: list[float] = field(default_factory=list)


class Generation:
    def __init__(
        self,
        engine: Engine,
        req: EngineRequest,
        *,
        model_name: str,
        metrics: ServerMetrics | None = None,
        request_timeout_s: float = 0.0,
        length_message: str = "",
    ) -> None:
        self.engine = engine
        self.req = req
        self.model_name = model_name
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.length_message = length_message
        self.cancel_reason: str | None = None
        self.timed_out = False
        self.finished: Finished | None = None
        self._abort_task: asyncio.Task[None] | None = None
        self._engine_started = False

    # -- control ---------------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        """Abort the sequence inside the engine; the stream ends with CANCELLED(reason).

        Idempotent; a no-op once finished."""
        if self.finished is not None or self.cancel_reason is not None:
            return
        self.cancel_reason = reason or "cancelled"
        if self._engine_started:
            self._abort_task = asyncio.ensure_future(self.engine.abort(self.req.request_id))
            self._abort_task.add_done_callback(_log_abort_failure)

    def _on_timeout(self) -> None:
        if self.finished is None and self.cancel_reason is None:
            self.timed_out = True
            self.cancel(f"request exceeded {self.request_timeout_s:g}s")

    # -- the stream ------------------------------------------------------------------------
    async def run(self) -> AsyncGenerator[Delta | Finished, None]:
        req = self.req
        info = self.engine.info
        clock = _Clock(arrival=req.arrival or time.monotonic())
        seq_no = 0
        completion = len(req.continuation_token_ids)
        new_tokens = 0
        reason: Finish | None = None
        message = ""
        end: float | None = None

        detok = IncrementalDetokenizer(self.engine.token_bytes, req.continuation_token_ids)
        stop: StopMatcher | None = None
        if req.sampling.stop:
            prime = IncrementalDetokenizer(self.engine.token_bytes)
            stop = StopMatcher(
                req.sampling.stop, "".join(prime.push(t) for t in req.continuation_token_ids)
            )

        # A continuation of a generation that had already ended ends at once, as it would have.
        if any(t in info.eos_token_ids for t in req.continuation_token_ids) or (
            stop is not None and stop.stopped
        ):
            reason, message = Finish.STOP, "the continuation already ended the generation"
        elif req.max_new_tokens <= 0:
            reason, message = Finish.LENGTH, self.length_message or "max_tokens reached"
        elif self.cancel_reason is not None:
            reason, message = Finish.CANCELLED, self.cancel_reason
        if reason is not None:
            self.finished = self._finished(reason, message, clock, completion, 0, time.monotonic())
            self._record(self.finished, clock, 0, aborted_rpc=False)
            yield self.finished
            return

        loop = asyncio.get_running_loop()
        timer = (
            loop.call_later(self.request_timeout_s, self._on_timeout)
            if self.request_timeout_s > 0
            else None
        )
        rpc_gone = True
        steps = self.engine.generate(req)
        self._engine_started = True
        try:
            async with contextlib.aclosing(steps):
                async for step in steps:
                    if self.cancel_reason is not None:
                        # Cancelled: nothing more is streamed, not even tokens the engine made
                        # before it learnt of the cancel (merged into this step while the
                        # writer was busy); leaving the block closes `steps`, which aborts in
                        # the engine.
                        reason, end = Finish.CANCELLED, time.monotonic()
                        break
                    ids = step.token_ids
                    logprobs = step.logprobs
                    text = ""
                    stop_string = False
                    if ids:
                        parts: list[str] = []
                        for i, token_id in enumerate(ids):
                            piece = detok.push(token_id)
                            if stop is not None:
                                piece = stop.push(piece)
                            parts.append(piece)
                            if stop is not None and stop.stopped:
                                ids = ids[: i + 1]
                                logprobs = logprobs[: i + 1] if logprobs else logprobs
                                reason, stop_string = Finish.STOP, True
                                break
                        text = "".join(parts)
                        times = step.times[: len(ids)]
                        self._clock_tokens(clock, times)
                        new_tokens += len(ids)
                        completion += len(ids)
                        if stop_string:
                            end = times[-1] if times else time.monotonic()
                    if reason is None and step.finish is not None:
                        reason, message = step.finish, step.message
                        end = step.finished_at or (clock.last_token or time.monotonic())
                        if reason in (Finish.STOP, Finish.LENGTH) and stop is not None:
                            # The generation ended without completing a stop string: the text
                            # held back as its possible start was generated text after all; it
                            # goes out with the step's last tokens.
                            text += stop.flush()
                    if ids or text:
                        # Everything the engine produced since the previous read is one delta,
                        # so a writer that fell behind catches up with one message.
                        seq_no += 1
                        yield Delta(seq_no, text, list(ids), logprobs if ids else None)
                    if stop_string:
                        await self.engine.abort(req.request_id)
                    if reason is not None:
                        break
                else:
                    reason = Finish.CANCELLED if self.cancel_reason else Finish.ERROR
                    message = "" if self.cancel_reason else "engine ended the stream early"
            rpc_gone = False
        except Overloaded:
            # No slot within the queue timeout: nothing was generated; the caller refuses the
            # call with RESOURCE_EXHAUSTED instead of finishing it.
            rpc_gone = False
            raise
        except EngineError as exc:
            log.error("engine failure: %s", exc, extra={"fields": {"model": self.model_name}})
            reason, message = Finish.ERROR, str(exc) or "engine failure"
            rpc_gone = False
        except Exception as exc:  # a bug, not the engine: still one final message
            log.exception("generation failed", extra={"fields": {"model": self.model_name}})
            reason, message = Finish.ERROR, f"internal error: {type(exc).__name__}"
            rpc_gone = False
        finally:
            if timer is not None:
                timer.cancel()
            if rpc_gone:
                # The RPC was cancelled (client gone, deadline) or something unexpected was
                # raised: the engine sequence was aborted by closing `steps`; record it.
                gone = self._finished(
                    Finish.CANCELLED, "rpc cancelled", clock, completion, seq_no, time.monotonic()
                )
                self.finished = gone
                self._record(gone, clock, new_tokens, aborted_rpc=True)
        assert reason is not None
        if reason is Finish.CANCELLED:
            if self.timed_out:
                reason = Finish.TIMEOUT
            message = self.cancel_reason or message or "cancelled"
        elif reason is Finish.LENGTH and not message:
            message = self._length_message(completion)
        finish_time = end if end is not None else time.monotonic()
        if reason in (Finish.CANCELLED, Finish.TIMEOUT, Finish.ERROR):
            finish_time = time.monotonic()
        self.finished = self._finished(reason, message, clock, completion, seq_no, finish_time)
        self._record(self.finished, clock, new_tokens, aborted_rpc=False)
        yield self.finished

    # -- helpers ---------------------------------------------------------------------------
    def _length_message(self, completion: int) -> str:
        if self.length_message and completion >= self.req.max_new_tokens + len(
            self.req.continuation_token_ids
        ):
            return self.length_message
        return ""

    def _clock_tokens(self, clock: _Clock, times: list[float]) -> None:
        if not times:
            return
        prev = clock.last_token
        if clock.first_token is None:
            clock.first_token = times[0]
        for t in times:
            if prev is not None:
                clock.itl.append(t - prev)
            prev = t
        clock.last_token = prev
        if self.metrics is not None and clock.itl:
            attrs = {"model_name": self.model_name}
            for gap in clock.itl:
                self.metrics.itl.record(gap, attrs)
            clock.itl.clear()

    def _finished(
        self,
        reason: Finish,
        message: str,
        clock: _Clock,
        completion: int,
        last_seq: int,
        end: float,
    ) -> Finished:
        arrival = clock.arrival
        scheduled = self.req.scheduled_at
        last = clock.last_token if reason in (Finish.STOP, Finish.LENGTH) else None
        total_end = max(last or end, arrival)
        queue_end = scheduled if scheduled is not None else total_end
        return Finished(
            reason=reason,
            prompt_tokens=len(self.req.prompt_token_ids),
            completion_tokens=completion,
            queue_us=_us(queue_end - arrival),
            time_to_first_token_us=_us(clock.first_token - arrival) if clock.first_token else 0,
            total_us=_us(total_end - arrival),
            message=message,
            last_seq=last_seq,
        )

    def _record(self, fin: Finished, clock: _Clock, new_tokens: int, *, aborted_rpc: bool) -> None:
        m = self.metrics
        if m is None:
            return
        attrs = {"model_name": self.model_name}
        m.request_success.add(1, {**attrs, "finished_reason": fin.reason.value})
        m.e2e.record(fin.total_us / 1e6, attrs)
        m.queue.record(fin.queue_us / 1e6, attrs)
        evaluated = len(self.req.prompt_token_ids) + len(self.req.continuation_token_ids)
        m.prompt_tokens.add(evaluated, attrs)
        m.request_prompt_tokens.record(evaluated, attrs)
        m.generation_tokens.add(new_tokens, attrs)
        m.request_generation_tokens.record(new_tokens, attrs)
        scheduled = self.req.scheduled_at
        if clock.first_token is not None:
            m.ttft.record(fin.time_to_first_token_us / 1e6, attrs)
            if scheduled is not None:
                m.prefill.record(max(0.0, clock.first_token - scheduled), attrs)
            if clock.last_token is not None:
                m.decode.record(max(0.0, clock.last_token - clock.first_token), attrs)
        if scheduled is not None:
            end = clock.arrival + fin.total_us / 1e6
            m.inference.record(max(0.0, end - scheduled), attrs)


def _log_abort_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine abort failed: %r", task.exception())


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))
