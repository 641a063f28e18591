"""The WebSocket front end (docs/protocol.md): upgrade checks, one `Conn` per socket, its frames.

Served by aiohttp on the gateway's port (`handle` takes the upgrade requests of `/ws`): the
upgrade is checked before it is accepted (a refusal is a `GatewayError`, answered as HTTP like
any route's). A
socket's frames are parsed by gateway/protocol.py and dispatched here: `submit` goes to the
admission (gateway/admission.py), `resume` to the token feed (gateway/feed.py), `cancel` to the
prompts topic. Every refusal is a `GatewayError`, rendered as an `error` frame by
`protocol.error_frame` with the frame's `client_ref`. Outgoing frames wait in the socket's
bounded outbox (gateway/router.py); `_sender` writes them, heartbeats an idle socket, and a
socket that falls `GATEWAY_SEND_BUFFER` frames behind is closed with 4008.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

from gateway import auth, errors, protocol
from gateway.admission import Admission, Admitted
from gateway.cancels import Cancels
from gateway.errors import GatewayError
from gateway.feed import Resumption, TokenFeed
from gateway.follow import Followers
from gateway.limits import FrameLimits, TokenBucket
from gateway.metrics import GatewayMetrics
from gateway.quota import Quota
from gateway.router import Outbox, Watch
from gateway.settings import Settings
from gateway.store import RequestStore, now_ms
from gateway.tasks import TaskSet

log = logging.getLogger("gateway")

# A socket's entry in its tenant's socket set lives this long unless refreshed (a crashed
# replica's sockets stop counting after it).
SOCKET_LEASE_MS = 60_000
# A socket follows at most this many unfinished requests (submits and resumes beyond:
# `quota_exceeded`, reason `watches`); finished ones are forgotten first.
MAX_WATCHES = 256
# A ping after this long without anything from the client; no pong within half of it: the
# connection is dropped (a client that vanished without closing).
PING_INTERVAL_S = 20.0
# How long a close waits for the client's close frame, and how long a socket being closed may
# take to flush what is queued for it before its connection is cut.
CLOSE_TIMEOUT_S = 2.0
FLUSH_TIMEOUT_S = 3.0
# Bytes written to a socket between checks of its transport's buffer: `send` waits while the
# client does not read, so a stalled reader's frames pile up in its outbox (bounded, 4008)
# instead of in the transport.
WRITE_CHECK_BYTES = 32 * 1024


def origin_allowed(s: Settings, headers: Mapping[str, str]) -> bool:
    origin, host = headers.get("Origin"), headers.get("Host")
    return auth.origin_allowed(origin, s.origins, host, tls=bool(s.tls_cert))


@dataclass(frozen=True)
class Upgrade:
    """An upgrade request that passed the checks, waiting for its handshake to finish."""

    principal: auth.Principal
    member: str
    session_id: str | None


@dataclass(eq=False)
class Conn:
    ws: web.WebSocketResponse
    transport: asyncio.Transport
    principal: auth.Principal
    outbox: Outbox
    wake: asyncio.Event
    # "<gateway id>/<socket id>": its member in watchers sets and in the tenant's socket set.
    member: str
    session_id: str | None = None  # opened with a browser session: re-checked on each action
    watches: dict[str, Watch] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # catch-ups
    drained: bool = False
    received_at: float = 0.0  # monotonic time the frame being handled was read
    # Its cancel and resume frames' rate limit (gateway/limits.py).
    bucket: TokenBucket = field(default_factory=FrameLimits.socket_bucket)


class _SubmitFollower:
    """A socket's side of an admission (admission.Follower)."""

    def __init__(self, front: WebSocketFrontEnd, conn: Conn, client_ref: str | None) -> None:
        self.front = front
        self.conn = conn
        self.client_ref = client_ref

    @property
    def watcher(self) -> str:
        return self.conn.member

    def follow(self, admitted: Admitted) -> None:
        conn, rid = self.conn, admitted.request_id
        watch = Watch(
            rid,
            conn.outbox,
            admitted.seq_start,
            admitted.submitted_ms,
            tenant_id=conn.principal.tenant_id,
        )
        conn.watches[rid] = watch
        self.front.feed.follow(watch)
        metrics, received = self.front.metrics, conn.received_at
        watch.on_first_token = lambda: metrics.record_ttft(time.monotonic() - received)
        watch.on_done = lambda: metrics.record_e2e(time.monotonic() - received)
        conn.outbox.put(
            protocol.accepted(rid, self.client_ref, admitted.max_tokens, capped=admitted.capped)
        )

    def unfollow(self, request_id: str) -> None:
        watch = self.conn.watches.pop(request_id, None)
        if watch is not None:
            self.front.feed.unfollow(watch)


@dataclass(kw_only=True, eq=False)
class WebSocketFrontEnd:
    settings: Settings
    conns: set[Conn]  # the open sockets (the gateway counts them)
    metrics: GatewayMetrics
    authenticator: auth.Authenticator
    admission: Admission
    feed: TokenFeed
    followers: Followers
    store: RequestStore
    cancels: Cancels
    limits: FrameLimits
    quota: Quota
    tasks: TaskSet
    draining: Callable[[], bool]
    # Upgrades that passed `check_upgrade` and are not yet open sockets (they count towards
    # GATEWAY_MAX_SOCKETS too).
    _upgrading: int = field(default=0, init=False)

    # ---- upgrade -----------------------------------------------------------------------------

    async def check_upgrade(self, headers: Mapping[str, str]) -> Upgrade:
        """Refuse an upgrade before it happens (`GatewayError`, answered as HTTP), or say who
        it is for."""
        if self.draining():
            raise GatewayError(errors.OVERLOADED, "draining", reason="draining")
        if not origin_allowed(self.settings, headers):
            raise GatewayError(errors.FORBIDDEN, "origin")
        if len(self.conns) + self._upgrading >= self.settings.max_sockets:
            raise GatewayError(
                errors.OVERLOADED, "too many sockets", retry_after_ms=1000, reason="overloaded"
            )
        authorization, cookie = headers.get("Authorization"), headers.get("Cookie")
        principal = await self.authenticator.principal(authorization, cookie)
        if principal is None:
            raise GatewayError(errors.UNAUTHORIZED, "missing or invalid credentials")
        member = f"{self.settings.gateway_id}/{uuid.uuid4().hex[:16]}"
        limits = principal.limits
        if not await self.quota.open_socket(
            principal.tenant_id, member, limits.max_sockets, now_ms(), SOCKET_LEASE_MS
        ):
            self.metrics.quota_refusals["sockets"] += 1
            raise GatewayError(
                errors.QUOTA_EXCEEDED, "too many sockets for tenant", reason="sockets"
            )
        # A socket opened with a session cookie lives only as long as its session.
        return Upgrade(principal, member, auth.session_id_of(authorization, cookie))

    # ---- a socket's life ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """An upgrade request for `/ws`: checks, upgrade, then the socket's frames until it
        closes."""
        upgrade = await self.check_upgrade(request.headers)
        ws = web.WebSocketResponse(
            timeout=CLOSE_TIMEOUT_S,
            heartbeat=PING_INTERVAL_S,
            compress=False,  # token frames are tiny; deflate state would ~3x a socket's memory
            # The protocol's largest frame is max_frame_bytes (parse answers invalid_request up
            # to twice that; above, aiohttp closes with 1009). aiohttp pauses reading past
            # 128 KiB queued: a socket buffers that plus one message at most.
            max_msg_size=2 * self.settings.max_frame_bytes,
            writer_limit=WRITE_CHECK_BYTES,
        )
        self._upgrading += 1
        try:
            await ws.prepare(request)  # HTTPBadRequest: not a valid WebSocket handshake
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("connection lost during the upgrade")
        except BaseException:
            self.tasks.spawn(self.quota.close_socket(upgrade.principal.tenant_id, upgrade.member))
            raise
        finally:
            self._upgrading -= 1
        try:
            await self._serve(upgrade, ws, transport)
        except Exception:  # the upgrade is answered: nothing to render as HTTP any more
            log.exception("socket handler failed")
        return ws

    async def _serve(
        self, upgrade: Upgrade, ws: web.WebSocketResponse, transport: asyncio.Transport
    ) -> None:
        wake = asyncio.Event()

        def on_overflow() -> None:
            self.tasks.spawn(self._close_slow(conn))

        outbox = Outbox(self.settings.send_buffer, wake.set, on_overflow)
        conn = Conn(
            ws, transport, upgrade.principal, outbox, wake, upgrade.member, upgrade.session_id
        )
        self.conns.add(conn)
        sender = asyncio.create_task(self._sender(conn))
        heartbeat_ms = int(self.settings.heartbeat_s * 1000)
        tenant = conn.principal.tenant_id
        outbox.put(
            protocol.hello(
                self.settings.gateway_id, heartbeat_ms, tenant, self.settings.default_model
            )
        )
        try:
            # Ends at the client's close, a close of ours, or an error: a message over the
            # size limit (1009) or invalid UTF-8 in a text frame (1007), which aiohttp answers
            # with that close code.
            async for msg in ws:
                if outbox.overflowed or msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                conn.received_at = time.monotonic()
                await self._handle(conn, msg.data)
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            self._disconnected(conn)

    def drain(self) -> None:
        """Close every socket with 1012: clients reconnect elsewhere and resume; their
        requests keep running (no grace timers)."""
        for conn in list(self.conns):
            conn.drained = True
            self.tasks.spawn(
                self._close(conn, protocol.CLOSE_DRAIN, "gateway restarting: reconnect")
            )

    async def close_all(self) -> None:
        """At stop: close the sockets still open with 1001 (going away)."""
        await asyncio.gather(
            *(self._close(c, WSCloseCode.GOING_AWAY, "gateway stopping") for c in list(self.conns))
        )

    def leases(self) -> list[tuple[str, str]]:
        """(tenant, member) of every open socket: their leases in the tenants' socket sets."""
        return [(c.principal.tenant_id, c.member) for c in self.conns]

    def _disconnected(self, conn: Conn) -> None:
        self.conns.discard(conn)
        conn.outbox.closed = True
        conn.outbox.clear()
        tenant = conn.principal.tenant_id
        self.tasks.spawn(self.quota.close_socket(tenant, conn.member))
        grace = not conn.drained and not self.draining()
        for rid, watch in conn.watches.items():
            self.feed.unfollow(watch)
            task = conn.tasks.get(rid)
            if task is not None:
                task.cancel()
            if not watch.finished:
                self.followers.detach(rid, conn.member, tenant, grace=grace)

    # ---- frames ------------------------------------------------------------------------------

    async def _handle(self, conn: Conn, frame: str | bytes) -> None:
        try:
            msg = protocol.parse(frame, self.settings.max_frame_bytes)
        except protocol.ProtocolError as exc:
            self.metrics.invalid_frames += 1
            conn.outbox.put(exc.frame())
            return
        except Exception:  # a parser bug must not end the socket (nor show a traceback)
            log.exception("parsing a frame failed")
            conn.outbox.put(protocol.error_frame(errors.internal(retry_after_ms=None)))
            return
        ref = None if isinstance(msg, protocol.Ping) else msg.client_ref
        try:
            await self._dispatch(conn, msg)
        except GatewayError as err:
            conn.outbox.put(protocol.error_frame(err, ref))
        except Exception:
            log.exception("frame handling failed")
            # With the frame's client_ref, so that the client knows which submit failed
            # (e.g. no Redis connection free within 5 s under a burst) and retries it.
            conn.outbox.put(protocol.error_frame(errors.internal(), ref))

    async def _dispatch(self, conn: Conn, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Ping):
            conn.outbox.put(msg.reply or protocol.pong(msg.data))
            return
        if isinstance(msg, protocol.Hello):
            # Tokens queued from now on; a later hello without it turns batching off again.
            conn.outbox.batch_tokens = protocol.TOKENS in msg.capabilities
            return
        try:
            conn.principal = await self.authenticator.recheck(conn.principal, conn.session_id)
        except GatewayError as err:
            # Not an answer to this frame (no client_ref): the socket ends.
            conn.outbox.put(protocol.error_frame(err))
            self.tasks.spawn(
                self._close_after_flush(conn, protocol.CLOSE_UNAUTHORIZED, "unauthorized")
            )
            return
        if isinstance(msg, protocol.Submit):
            self._check_watches(conn)
            follower = _SubmitFollower(self, conn, msg.client_ref)
            admitted = await self.admission.submit(conn.principal, msg, follower)
            if admitted.existing:  # an idempotent resubmit: follow the request that holds the key
                rid, start = admitted.request_id, admitted.seq_start
                await self._resume(conn, rid, start, msg.client_ref, existing=True)
        elif isinstance(msg, protocol.Cancel):
            self._limit(conn, "cancel")
            tenant = conn.principal.tenant_id
            meta = await self.store.lookup(tenant, msg.request_id)
            if meta is None:
                raise errors.not_found(msg.request_id)
            # Ended already, or cancelled before: nothing is written (its `done` says how it
            # ended, on every socket that follows it).
            await self.cancels.cancel(meta)
        else:
            self._limit(conn, "resume")
            self._check_watches(conn)
            await self._resume(conn, msg.request_id, msg.after_seq, msg.client_ref)

    def _limit(self, conn: Conn, frame: str) -> None:
        """The socket's and its tenant's rate limit of cancel and resume frames."""
        wait_ms = self.limits.take(conn.principal.tenant_id, conn.bucket)
        if wait_ms:
            self.metrics.rate_limited[frame] += 1
            raise errors.rate_limited(frame, wait_ms)

    def _check_watches(self, conn: Conn) -> None:
        """At most MAX_WATCHES unfinished requests followed per socket (finished ones are
        forgotten first)."""
        if len(conn.watches) < MAX_WATCHES:
            return
        for rid in [r for r, w in conn.watches.items() if w.finished]:
            del conn.watches[rid]
        if len(conn.watches) >= MAX_WATCHES:
            raise errors.too_many_watches(MAX_WATCHES)

    async def _resume(
        self,
        conn: Conn,
        request_id: str,
        after_seq: int,
        client_ref: str | None,
        existing: bool = False,
    ) -> None:
        """Follow a request from `after_seq` on, on any replica: replayed from its reply
        partition, then live."""
        meta = await self.store.lookup(conn.principal.tenant_id, request_id)
        if meta is None:
            raise errors.not_found(request_id)
        slot = self.feed.take_resume_slot(meta)
        try:
            old = conn.watches.pop(request_id, None)
            if old is not None:  # this socket followed it already: the new resume replaces that
                self.feed.unfollow(old)
                task = conn.tasks.pop(request_id, None)
                if task is not None:
                    task.cancel()
            await self.followers.attach(request_id, conn.member)
            if existing:  # an idempotent resubmit is answered like any submit
                conn.outbox.put(protocol.accepted(request_id, client_ref, 0, existing=True))
            resumption = self.feed.resume(meta, after_seq, conn.outbox, slot=slot)
        except BaseException:
            slot.release()
            raise
        conn.watches[request_id] = resumption.watch
        catch_up = asyncio.create_task(self._catch_up(conn, resumption, client_ref))
        catch_up.add_done_callback(lambda _task: slot.release())  # even if it never ran
        conn.tasks[request_id] = catch_up

    async def _catch_up(self, conn: Conn, r: Resumption, client_ref: str | None) -> None:
        rid = r.watch.request_id
        try:
            await self.feed.catch_up(r)
        except GatewayError as err:
            if conn.watches.get(rid) is r.watch:
                del conn.watches[rid]
            conn.outbox.put(protocol.error_frame(err, client_ref))
        finally:
            if conn.tasks.get(rid) is asyncio.current_task():
                del conn.tasks[rid]

    # ---- sending -----------------------------------------------------------------------------

    async def _sender(self, conn: Conn) -> None:
        outbox, ws = conn.outbox, conn.ws
        try:
            while True:
                if outbox.overflowed:
                    return
                if not outbox.frames:
                    conn.wake.clear()
                    try:
                        await asyncio.wait_for(conn.wake.wait(), self.settings.heartbeat_s)
                    except TimeoutError:
                        outbox.put(protocol.heartbeat(now_ms()))
                    continue
                n = 0
                while outbox.frames and n < 64 and not outbox.overflowed:
                    # Encoded here, not by send_str: a lone surrogate that slipped through
                    # (protocol.parse refuses them) must not make the send fail and kill the
                    # socket; it becomes "?". The same one encode either way.
                    frame = outbox.take().encode("utf-8", "replace")
                    # Waits while the client does not read (WRITE_CHECK_BYTES).
                    await ws.send_frame(frame, WSMsgType.TEXT)
                    n += 1
                self.metrics.frames_sent += n
                await asyncio.sleep(0)  # let other sockets send too
        except ConnectionResetError:  # the socket is closing or gone
            return

    async def _close(self, conn: Conn, code: int, reason: str) -> None:
        """Close a socket with `code` once what is queued for it, its close frame last, is
        written: with no write buffer allowed, aiohttp's close waits for exactly that before
        it closes the connection. A client that does not take it within FLUSH_TIMEOUT_S (it
        stopped reading) is cut off, so that no connection outlives its socket with its
        buffer."""
        conn.transport.set_write_buffer_limits(high=0)
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await conn.ws.close(code=code, message=reason.encode())
        except TimeoutError:
            conn.transport.abort()

    async def _close_after_flush(self, conn: Conn, code: int, reason: str) -> None:
        for _ in range(100):
            if not conn.outbox.frames:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        await self._close(conn, code, reason)

    async def _close_slow(self, conn: Conn) -> None:
        """A socket fell `send_buffer` frames behind: close it (4008); if even the close frame
        cannot be written in time, the connection is dropped."""
        self.metrics.send_buffer_overflows += 1
        await self._close(
            conn, protocol.CLOSE_SLOW_CONSUMER, "send buffer full: reconnect and resume"
        )
