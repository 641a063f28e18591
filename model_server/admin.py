"""The admin RPC (`llmstream.v1.ModelAdminService`: LoadModel, UnloadModel) and its guard.

Off unless asked for (`--admin`, `LLMSTREAM_MODEL_SERVER_ADMIN=1`); then served on its own
port (`LLMSTREAM_MODEL_SERVER_ADMIN_PORT`, loopback unless `..._ADMIN_HOST` says otherwise),
never on the public one, and every call on that port — reflection included — needs
`authorization: Bearer <token>`:

- no `authorization`, or not `Bearer <token>` -> UNAUTHENTICATED "missing bearer token";
- a token that matches none of the configured ones -> UNAUTHENTICATED "invalid admin token".

Both are UNAUTHENTICATED (gRPC's code for credentials that do not authenticate); there is one
principal, so PERMISSION_DENIED (authenticated but not allowed) never applies. Tokens come from
`LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN_FILE` (one token per line: two lines during a rotation;
re-read when the file changes) or `LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN`, and are compared in
constant time. `LoadModel`'s options and limits go through `admin_options` (allow-list).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
from google.protobuf import json_format

from llmstream.v1 import model_admin_pb2, model_admin_pb2_grpc
from model_server.admin_options import AdminPolicy, check_limits, check_options
from model_server.engines import ENGINES
from model_server.errors import InvalidArgument, ModelServerError, Unavailable
from model_server.registry import ModelRegistry, ModelSpec
from model_server.service import ServerState, model_info, status_code
from model_server.types import ModelLimits

log = logging.getLogger(__name__)

BEARER = "bearer "
# Shorter tokens are refused at start: an admin token must not be guessable.
MIN_TOKEN_CHARS = 16


class AdminTokenError(ValueError):
    """The admin tokens are unusable (none, too short, unreadable file); names the setting."""


def parse_tokens(text: str, where: str) -> tuple[bytes, ...]:
    """The tokens of a token file or variable: one per non-empty line, blanks stripped."""
    tokens = tuple(line.strip().encode() for line in text.splitlines() if line.strip())
    if not tokens:
        raise AdminTokenError(f"{where}: no admin token")
    short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS]
    if short:
        raise AdminTokenError(
            f"{where}: an admin token is shorter than {MIN_TOKEN_CHARS} characters"
        )
    return tokens


def token_matches(presented: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Constant time in the token's content; every configured token is compared."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(presented, token)
    return found


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    """The token of an `authorization: Bearer <token>` header, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if text[: len(BEARER)].lower() == BEARER and text[len(BEARER) :].strip():
                return text[len(BEARER) :].strip().encode()
            return None
    return None


@dataclass
class AdminTokens:
    """The accepted tokens: from a file (re-read when its inode, modification time or size
    changes, so a rotation needs no restart) or a fixed value."""

    file: str = ""
    value: str = ""
    _stamp: tuple[int, int, int] | None = None
    _tokens: tuple[bytes, ...] = ()

    def load(self) -> tuple[bytes, ...]:
        """Read (or re-read) the tokens; AdminTokenError when unusable. Blocking: run it in a
        thread from the event loop."""
        if not self.file:
            if not self._tokens:
                self._tokens = parse_tokens(self.value, "LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN")
            return self._tokens
        where = f"LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN_FILE ({self.file})"
        try:
            st = os.stat(self.file)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a Kubernetes secret swaps inodes
            if stamp != self._stamp:
                with open(self.file, encoding="utf-8") as f:
                    self._tokens = parse_tokens(f.read(), where)
                self._stamp = stamp
        except OSError as exc:
            raise AdminTokenError(f"{where}: {exc.strerror}") from None
        return self._tokens


class BearerAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call on the admin port without a valid bearer token (before the request
    is even read), unknown methods included. The refusal keeps the method's shape (unary or
    streaming) so that gRPC answers it with the status, not an internal error."""

    def __init__(self, tokens: AdminTokens) -> None:
        self.tokens = tokens
        self._last_warning = 0.0

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
    ) -> Any:
        presented = bearer_token(details.invocation_metadata)
        if presented is None:
            return await self._refuse(continuation, details, "missing bearer token")
        try:
            tokens = await asyncio.to_thread(self.tokens.load)
        except AdminTokenError as exc:
            # A token file broken during a rotation: refuse everyone (fail closed), say why.
            log.error("admin tokens unusable: %s", exc)
            return await self._refuse(continuation, details, "admin tokens unavailable")
        if not token_matches(presented, tokens):
            return await self._refuse(continuation, details, "invalid admin token")
        return await continuation(details)

    async def _refuse(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
        message: str,
    ) -> Any:
        now = time.monotonic()
        if now - self._last_warning > 10.0:  # a scan must not flood the log
            self._last_warning = now
            log.warning("admin call refused: %s (%s)", message, details.method)
        handler = await continuation(details)

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # An unknown method is refused the same way: without a token, nobody learns which
        # methods exist (gRPC answers a unary call from a streaming handler just as well).
        if handler is None or (handler.request_streaming and handler.response_streaming):
            return grpc.stream_stream_rpc_method_handler(stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(stream)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)


class ModelAdminService(model_admin_pb2_grpc.ModelAdminServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        state: ServerState,
        default_limits: ModelLimits,
        policy: AdminPolicy,
    ) -> None:
        self.registry = registry
        self.state = state
        self.default_limits = default_limits
        self.policy = policy

    async def LoadModel(
        self,
        request: model_admin_pb2.LoadModelRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> model_admin_pb2.LoadModelResponse:
        try:
            if self.state.draining:
                raise Unavailable("the server is draining")
            spec = spec_from_request(request, self.default_limits, self.policy)
            started = time.monotonic()
            handle, replaced = await self.registry.load(spec)
        except ModelServerError as err:
            log.info("admin: LoadModel %r refused: %s", request.name, err)
            await context.abort(status_code(err), str(err))
        log.info(
            "admin: loaded %s version %s in %.2fs",
            handle.name,
            handle.version,
            time.monotonic() - started,
        )
        return model_admin_pb2.LoadModelResponse(
            model=model_info(handle), replaced_version=replaced or ""
        )

    async def UnloadModel(
        self,
        request: model_admin_pb2.UnloadModelRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> model_admin_pb2.UnloadModelResponse:
        try:
            if not request.name:
                raise InvalidArgument("name", "must not be empty")
            timeout = (request.drain_timeout_ms or 30_000) / 1000.0
            cancelled = await self.registry.unload(request.name, timeout)
        except ModelServerError as err:
            await context.abort(status_code(err), str(err))
        log.info("admin: unloaded %s (%d streams cancelled)", request.name, cancelled)
        return model_admin_pb2.UnloadModelResponse(cancelled_streams=cancelled)


def spec_from_request(
    request: model_admin_pb2.LoadModelRequest, defaults: ModelLimits, policy: AdminPolicy
) -> ModelSpec:
    """The model to load, or InvalidArgument naming the refused field or option."""
    if not request.name:
        raise InvalidArgument("name", "must not be empty")
    if request.engine not in ENGINES:
        raise InvalidArgument("engine", f"must be one of {', '.join(sorted(ENGINES))}")
    lim = request.limits
    changes: dict[str, Any] = {}
    for f in ("max_concurrency", "max_queue", "max_context", "max_tokens", "default_max_tokens"):
        value = getattr(lim, f)
        if value:
            changes[f] = int(value)
    if lim.queue_timeout_ms:
        changes["queue_timeout_s"] = lim.queue_timeout_ms / 1000.0
    if lim.request_timeout_ms:
        changes["request_timeout_s"] = lim.request_timeout_ms / 1000.0
    limits = replace(defaults, **changes)
    if limits.default_max_tokens > limits.max_tokens:
        limits = replace(limits, default_max_tokens=limits.max_tokens)
    raw = json_format.MessageToDict(request.options) if request.HasField("options") else {}
    options = check_options(request.engine, raw, policy)
    check_limits(request.engine, limits, options, policy)
    return ModelSpec(
        name=request.name,
        engine=request.engine,
        version=request.version or None,
        limits=limits,
        options=options,
    )
