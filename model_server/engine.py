"""The small interface every engine implements, and helpers shared by our own engines.

An engine turns an ``EngineRequest`` (token ids in, limits already applied) into a stream of
``EngineStep``s. Contract:

- ``generate(req)`` is an async iterator. Its last step carries ``finish`` (STOP for an
  end-of-sequence token, LENGTH at ``max_new_tokens``, CANCELLED after ``abort``). Engine
  failures are raised as ``EngineError``.
- ``abort(request_id)`` stops the sequence inside the engine: no token is produced after it
  returns (a token already being computed is discarded), and the stream ends with a
  CANCELLED step. Closing the iterator (``aclose``) aborts too.
- Engines set ``req.scheduled_at`` when the sequence gets a decode slot.
- ``tokenize`` renders chat prompts with the model's own chat template.
- ``active_requests()`` lists sequences the engine still holds (tests check that a cancelled
  request is gone); ``running`` / ``waiting`` feed the metrics.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model_server.errors import EngineError, Overloaded
from model_server.scheduler import SlotScheduler
from model_server.types import EngineRequest, EngineStep, Finish, ModelLimits, PromptInput


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Facts about the loaded model, known after ``load()``."""

    vocab_size: int
    eos_token_ids: frozenset[int]
    # Largest context the engine was configured for (prompt + completion).
    max_context: int
    # Version label derived from the weights (the config may override it).
    version: str


class Engine(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, options: Mapping[str, Any], limits: ModelLimits) -> None:
        self.options = dict(options)
        self.limits = limits
        self._info: EngineInfo | None = None

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineError(f"{self.kind} engine is not loaded")
        return self._info

    @abc.abstractmethod
    async def load(self) -> None:
        """Load the weights and warm up; afterwards ``info`` is set."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything; in-flight sequences must have been aborted before."""

    @abc.abstractmethod
    async def tokenize(self, prompt: PromptInput) -> list[int]:
        """Token ids of a text or chat prompt (chat: the model's template, generation prompt
        appended). Token-id prompts never reach this method."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token's text (special tokens: empty): the generation core does all
        detokenization and stop-string matching, whatever the engine."""

    @abc.abstractmethod
    def generate(self, req: EngineRequest) -> AsyncGenerator[EngineStep, None]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @property
    @abc.abstractmethod
    def running(self) -> int: ...

    @property
    @abc.abstractmethod
    def waiting(self) -> int: ...

    @abc.abstractmethod
    def active_requests(self) -> frozenset[str]: ...

    async def check_health(self) -> None:
        """Raise ``EngineError`` when the engine can no longer serve."""
        return None


class StepChannel:
    """Single-consumer queue of steps; pending steps are merged into one on ``get``.

    Merging is what keeps a slow reader from building a queue of tiny messages: it receives
    every token produced since its last read in one delta. ``put_threadsafe`` is for decode
    threads; it never blocks them.
    """

    __slots__ = ("_loop", "_pending", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: EngineStep | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, step: EngineStep) -> None:
        if self._pending is None:
            self._pending = step
        else:
            self._pending.merge(step)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def put_threadsafe(self, step: EngineStep) -> None:
        self._loop.call_soon_threadsafe(self.put, step)

    async def get(self) -> EngineStep:
        while self._pending is None:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        step, self._pending = self._pending, None
        return step


@dataclass(eq=False)
class Sequence:
    """An engine's bookkeeping for one request."""

    req: EngineRequest
    # Visible to decode threads; set once by abort().
    aborted: threading.Event = field(default_factory=threading.Event)
    abort_waiter: asyncio.Future[None] | None = None
    produced: int = 0


class SlotEngine(Engine):
    """Base of engines that schedule sequences on ``slots`` decode slots themselves.

    Handles the fair queue (``SlotScheduler``), the queue timeout and abort bookkeeping;
    subclasses implement ``_run(seq, slot)`` producing the steps.
    """

    def __init__(self, options: Mapping[str, Any], limits: ModelLimits, slots: int) -> None:
        super().__init__(options, limits)
        self._scheduler = SlotScheduler(slots)
        self._seqs: dict[str, Sequence] = {}
        self.tokens_produced = 0

    @property
    def running(self) -> int:
        return self._scheduler.running

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting

    @property
    def slots(self) -> int:
        return self._scheduler.slots

    def active_requests(self) -> frozenset[str]:
        return frozenset(self._seqs)

    async def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        seq.aborted.set()
        if seq.abort_waiter is not None and not seq.abort_waiter.done():
            seq.abort_waiter.set_result(None)

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineStep, None]:
        if req.request_id in self._seqs:
            raise EngineError(f"duplicate engine request id {req.request_id!r}")
        loop = asyncio.get_running_loop()
        seq = Sequence(req=req, abort_waiter=loop.create_future())
        self._seqs[req.request_id] = seq
        try:
            slot = await self._wait_for_slot(seq)
            if slot is None:
                yield _cancelled()
                return
            req.scheduled_at = time.monotonic()
            async with contextlib.aclosing(self._run(seq, slot)) as steps:
                async for step in steps:
                    yield step
        finally:
            seq.aborted.set()
            del self._seqs[req.request_id]

    async def _wait_for_slot(self, seq: Sequence) -> int | None:
        """The slot index, or None when aborted while queued. Raises Overloaded on timeout."""
        assert seq.abort_waiter is not None
        if seq.aborted.is_set():
            return None
        acquire = asyncio.ensure_future(self._scheduler.acquire(seq.req.priority))
        timeout = self.limits.queue_timeout_s or None
        try:
            waiters: set[asyncio.Future[Any]] = {acquire, seq.abort_waiter}
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._drop_acquire(acquire)
            raise
        if acquire.done() and not seq.aborted.is_set():
            return acquire.result()
        if not acquire.done():
            acquire.cancel()
            # Let the waiter leave the queue now, so that `waiting` is exact on return.
            await asyncio.wait({acquire})
        self._drop_acquire(acquire)
        if seq.aborted.is_set():
            return None
        raise Overloaded(
            f"no decode slot within {self.limits.queue_timeout_s:g}s "
            f"({self.running} running, {self.waiting} waiting)"
        )

    def _drop_acquire(self, acquire: asyncio.Future[int]) -> None:
        if not acquire.done():
            # SlotScheduler.acquire hands on a slot granted while it is being cancelled.
            acquire.cancel()
        elif not acquire.cancelled() and acquire.exception() is None:
            self._scheduler.release(acquire.result())

    @abc.abstractmethod
    def _run(self, seq: Sequence, slot: int) -> AsyncGenerator[EngineStep, None]:
        """Produce the steps of ``seq`` on ``slot``; release the slot when done."""


def _cancelled() -> EngineStep:
    return EngineStep([], [], finish=Finish.CANCELLED, finished_at=time.monotonic())
