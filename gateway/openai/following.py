"""One HTTP request following one generation: the OpenAI routes' counterpart of a WebSocket.

A `Following` is the admission's `Follower` of a submit (its watch is registered before the
prompt is written, so no event is missed), or follows an existing request from a position
(`resume`: replayed from its reply partition on any replica, then live; dedup by seq makes
the seam exact: gateway/feed.py). Then either
- `stream`: Server-Sent Events as the watch renders them (gateway/openai/serving_*.py), from a
  bounded outbox; `: keep-alive` comments while the model is silent; a client that falls
  `GATEWAY_SEND_BUFFER` events behind is disconnected (it may resume), or
- `answer`: the terminal state with the whole text, for a response rendered at the end.

When the client goes away before the end, the request keeps running for the grace period and
is cancelled unless someone follows it again (gateway/follow.py), as for a WebSocket; a
background request (`background: true`) is never cancelled that way, and neither is one whose
stream ended because this replica is draining (the client resumes on another).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from gateway import errors
from gateway.admission import Admitted
from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.feed import Resumption
from gateway.openai import sse
from gateway.openai.protocol import GenerationRequest, StreamContext
from gateway.router import Outbox, Watch
from gateway.store import RequestMeta
from llmstream.fold import RequestState

if TYPE_CHECKING:
    from gateway.openai.api_router import OpenAIRoutes

log = logging.getLogger("gateway")

# How often a client waiting for a whole answer is checked for having gone away.
CLIENT_CHECK_S = 1.0
# Frames written per write call at most (one syscall for a burst, bounded latency for others).
WRITE_BATCH = 64


class Renderer(Protocol):
    """A stream of one endpoint (ChatCompletionStream, CompletionStream, ResponseStream)."""

    @property
    def token_after_seq(self) -> int: ...

    def opening(self) -> str: ...

    def token(self, request_id: str, seq: int, text: str) -> str: ...

    def done(self, state: RequestState) -> str: ...


class _Silent:
    """Frames of a watch whose answer is rendered whole from its state at the end."""

    @staticmethod
    def token(request_id: str, seq: int, text: str) -> str:
        return ""

    @staticmethod
    def done(state: RequestState) -> str:
        return ""


SILENT = _Silent()


# A stream of an endpoint from its context and the position the client already has.
Render = Callable[[StreamContext, int], Renderer]


class ClientGone(Exception):
    """The HTTP client closed the connection before its answer."""


class Following:
    def __init__(
        self, routes: OpenAIRoutes, principal: Principal, render: Render | None, background: bool
    ) -> None:
        """`render`: the endpoint's stream (None: the answer is rendered whole at the end)."""
        self.routes = routes
        self.principal = principal
        self.render = render
        self.background = background
        # Its member of the request's watchers set, as a WebSocket's: "<gateway id>/<id>".
        self.member = f"{routes.parts.settings.gateway_id}/{uuid.uuid4().hex[:16]}"
        self.wake = asyncio.Event()
        self.outbox = Outbox(routes.parts.settings.send_buffer, self.wake.set, self._overflowed)
        self.ctx: StreamContext | None = None
        self.watch: Watch | None = None
        self.ended = asyncio.Event()  # the watch reached the terminal state, or failed
        self.failed = False
        self.attached = False  # a member of the request's watchers set
        self._catch_up: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._closed = False

    @property
    def request_id(self) -> str:
        assert self.watch is not None
        return self.watch.request_id

    # ---- the admission's Follower --------------------------------------------------------

    @property
    def watcher(self) -> str:
        return self.member

    def describe(self, req: GenerationRequest) -> Callable[[Admitted], str]:
        """The context recorded with the request at submit (what a resume renders with)."""

        def context(admitted: Admitted) -> str:
            self.ctx = StreamContext.of(
                req, admitted.request_id, admitted.submitted_ms, admitted.max_tokens
            )
            return self.ctx.dumps()

        return context

    def follow(self, admitted: Admitted) -> None:
        frames = self._frames(-1)
        watch = Watch(
            admitted.request_id,
            self.outbox,
            admitted.seq_start,
            admitted.submitted_ms,
            frames=frames or SILENT,
            keep_text=frames is None,
            tenant_id=self.principal.tenant_id,
        )
        self._start(watch, frames)
        self.attached = True  # the admission recorded it as the first watcher
        self.routes.parts.feed.follow(watch)

    def unfollow(self, request_id: str) -> None:
        if self.watch is not None:
            self.routes.parts.feed.unfollow(self.watch)
            self.watch = None

    # ---- following an existing request -----------------------------------------------------

    async def resume(
        self, meta: RequestMeta, ctx: StreamContext, after: int, *, attach: bool = True
    ) -> None:
        """Follow `meta`'s request after stream position `after` (-1: from the start); with
        `attach`, as one of its followers (the grace period counts it)."""
        self.ctx = ctx
        frames = self._frames(after)
        feed = self.routes.parts.feed
        slot = feed.take_resume_slot(meta)
        try:
            if attach:
                await self.routes.parts.followers.attach(meta.request_id, self.member)
                self.attached = True
            r = feed.resume(
                meta,
                frames.token_after_seq if frames is not None else 0,
                self.outbox,
                frames or SILENT,
                slot=slot,
                keep_text=frames is None,
            )
        except BaseException:
            slot.release()
            raise
        self._start(r.watch, frames)
        self._catch_up = asyncio.create_task(self._catching_up(r))
        self._catch_up.add_done_callback(lambda _task: slot.release())  # even if it never ran

    async def _catching_up(self, r: Resumption) -> None:
        try:
            await self.routes.parts.feed.catch_up(r)
        except GatewayError:
            # The stream would have a gap: end it (the client resumes again).
            self.failed = True
            self.ended.set()
            self.wake.set()
            if self._transport is not None:
                self._transport.abort()

    def _frames(self, after: int) -> Renderer | None:
        """The renderer of a streaming follower (None: the answer is rendered at the end)."""
        assert self.ctx is not None
        return None if self.render is None else self.render(self.ctx, after)

    def _start(self, watch: Watch, frames: Renderer | None) -> None:
        self.watch = watch
        watch.on_done = self.ended.set
        if frames is not None:
            # At once: the client sees its stream start before the model's first token.
            opening = frames.opening()
            if opening:
                self.outbox.put(opening)

    # ---- answering -------------------------------------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Write the events as Server-Sent Events until the terminal one (then `[DONE]` where
        the endpoint has it), the client goes away, or falls too far behind."""
        resp = web.StreamResponse(headers={**sse.HEADERS, "X-Request-Id": self.request_id})
        await resp.prepare(request)
        self._transport = request.transport
        heartbeat = sse.HEARTBEAT.encode()
        outbox = self.outbox
        try:
            while not self.failed and not outbox.overflowed:
                if outbox.frames:
                    batch = [outbox.take() for _ in range(min(WRITE_BATCH, len(outbox.frames)))]
                    # A lone surrogate that slipped through becomes "?" instead of failing.
                    await resp.write("".join(batch).encode("utf-8", "replace"))
                    continue
                if self.watch is None or self.watch.finished:
                    await resp.write_eof()
                    break
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), self.routes.parts.settings.heartbeat_s)
                except TimeoutError:
                    await resp.write(heartbeat)
        except ConnectionError:
            pass  # the client went away
        finally:
            self.close()
        return resp

    async def answer(self, request: web.Request) -> RequestState:
        """The terminal state with the whole text; `ClientGone` if the client leaves first."""
        try:
            while not self.ended.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ended.wait(), CLIENT_CHECK_S)
                transport = request.transport
                if not self.ended.is_set() and (transport is None or transport.is_closing()):
                    raise ClientGone()
            return self._state()
        finally:
            self.close()

    async def snapshot(self, wait_s: float = 0.0) -> RequestState:
        """After `resume(..., attach=False)`: the state with the text so far, once caught up;
        with `wait_s`, up to that long more for the terminal state."""
        try:
            if self._catch_up is not None:
                await self._catch_up
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ended.wait(), wait_s)
            return self._state()
        finally:
            self.close()

    def _state(self) -> RequestState:
        if self.failed or self.watch is None:
            assert self.ctx is not None
            raise errors.resume_failed(self.ctx.request_id)
        return self.watch.state

    # ---- the end -----------------------------------------------------------------------------

    def _overflowed(self) -> None:
        """The client fell `GATEWAY_SEND_BUFFER` events behind: drop the connection (it may
        resume with Last-Event-ID); a write blocked on the full socket ends with it."""
        self.routes.parts.metrics.send_buffer_overflows += 1
        if self._transport is not None:
            self._transport.abort()

    def close(self, *, draining: bool = False) -> None:
        """Stop following. An unfinished request is left to the grace period, unless it is a
        background one or this replica drains (`draining`: the client resumes elsewhere)."""
        if self._closed:
            return
        self._closed = True
        self.outbox.closed = True
        self.outbox.clear()
        if self._catch_up is not None:
            self._catch_up.cancel()
        watch = self.watch
        if watch is None:
            return
        self.routes.parts.feed.unfollow(watch)
        if self.attached and not watch.finished:
            grace = not (self.background or draining or self.routes.parts.draining())
            self.routes.parts.followers.detach(
                watch.request_id, self.member, self.principal.tenant_id, grace=grace
            )

    def abort(self) -> None:
        """This replica drains: end the stream now; the client resumes on another replica."""
        self.close(draining=True)
        if self._transport is not None:
            self._transport.abort()
