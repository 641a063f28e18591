"""The OpenAI-compatible routes (docs/openai.md) on the gateway's aiohttp application.

`OpenAIRoutes.add_to(app)` adds them. Each handler authenticates like the WebSocket (bearer
key or browser session; an Origin not allowed is a 403), parses its body into a
`GenerationRequest` (gateway/openai/protocol.py), submits it through the same admission, and
answers through a `Following` (gateway/openai/following.py): Server-Sent Events, or the whole
answer rendered at the end (gateway/openai/serving_*.py). Every refusal is an `OpenAIError`,
rendered once here; a gateway refusal is translated by `errors.from_refusal`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import auth, errors
from gateway.errors import GatewayError
from gateway.openai import sse
from gateway.openai.errors import (
    SERVER_ERROR,
    OpenAIError,
    from_refusal,
    invalid_value,
    model_not_found,
    not_found,
)
from gateway.openai.following import ClientGone, Following, Render
from gateway.openai.protocol import (
    Api,
    GenerationRequest,
    StreamContext,
    dumps,
    idempotency_key,
    parse_chat,
    parse_completion,
    parse_json,
    parse_response,
    query_flag,
    starting_after,
)
from gateway.openai.serving_chat import ChatCompletionStream, chat_completion
from gateway.openai.serving_completions import CompletionStream, completion
from gateway.openai.serving_models import model_card, model_list
from gateway.openai.serving_responses import (
    ResponseStream,
    request_id_of,
    response_body,
    response_object,
)
from gateway.store import RequestMeta
from llmstream.fold import RequestState

if TYPE_CHECKING:
    from gateway.server import Parts

log = logging.getLogger("gateway")

# A cancel answers once the request ended, or after this long with the state it has then.
CANCEL_WAIT_S = 10.0
# The request id an answer names (its X-Request-Id header), kept on the HTTP request.
REQUEST_ID = web.RequestKey("llmstream_request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Endpoint:
    """What differs between the generating endpoints."""

    api: Api
    noun: str  # in messages
    parse: Callable[[Mapping[str, Any]], GenerationRequest]
    render: Render  # its stream
    body: Callable[[StreamContext, RequestState], dict[str, Any]]  # its whole answer


CHAT = Endpoint("chat", "chat completion", parse_chat, ChatCompletionStream, chat_completion)
COMPLETIONS = Endpoint("completions", "completion", parse_completion, CompletionStream, completion)
RESPONSES = Endpoint("responses", "response", parse_response, ResponseStream, response_body)


def _json(request: web.Request, obj: Any, status: int = 200, **headers: str) -> web.Response:
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return web.Response(
        status=status, text=dumps(obj), content_type="application/json", headers=headers
    )


def error_response(request: web.Request, err: OpenAIError) -> web.Response:
    return _json(request, err.body(), err.status, **err.headers())


def _openai(handler: Handler) -> Handler:
    """Every failure of a handler as an OpenAI error body with its status."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OpenAIError as err:
            return error_response(request, err)
        except GatewayError as err:
            return error_response(request, from_refusal(err))
        except ClientGone:
            return web.Response(status=499)  # nobody reads it (nginx's "client closed")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(request, OpenAIError(exc.status, exc.reason))
        except Exception:
            log.exception("OpenAI route failed")
            return error_response(
                request,
                OpenAIError(500, "internal error", error_type=SERVER_ERROR, code="internal_error"),
            )

    return handle


@dataclass(eq=False)
class OpenAIRoutes:
    parts: Parts  # the gateway's: admission, token feed, store, followers, catalog, ...
    # Open SSE streams: a drain ends them (their clients resume on another replica).
    streams: set[Following] = field(default_factory=set, init=False)

    def add_to(self, app: web.Application) -> None:
        routes = [
            ("GET", "/v1/models", self.list_models),
            ("GET", "/v1/models/{model}", self.retrieve_model),
            ("POST", "/v1/chat/completions", self._creator(CHAT)),
            ("GET", "/v1/chat/completions/{request_id}/stream", self._resumer(CHAT)),
            ("POST", "/v1/completions", self._creator(COMPLETIONS)),
            ("GET", "/v1/completions/{request_id}/stream", self._resumer(COMPLETIONS)),
            ("POST", "/v1/responses", self._creator(RESPONSES)),
            ("GET", "/v1/responses/{response_id}", self.retrieve_response),
            ("POST", "/v1/responses/{response_id}/cancel", self.cancel_response),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, _openai(handler))
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, _app: web.Application) -> None:
        for following in list(self.streams):
            following.abort()

    # ---- models ------------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        await self._principal(request)
        return _json(request, model_list(self.parts.models.served()))

    async def retrieve_model(self, request: web.Request) -> web.Response:
        await self._principal(request)
        name = request.match_info["model"]
        entry = self.parts.models.get(name)
        if entry is None:
            raise model_not_found(name)
        return _json(request, model_card(entry))

    # ---- generating --------------------------------------------------------------------------

    def _creator(self, endpoint: Endpoint) -> Handler:
        async def create(request: web.Request) -> web.StreamResponse:
            return await self._create(request, endpoint)

        return create

    async def _create(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        principal = await self._principal(request)
        req = endpoint.parse(parse_json(await request.read()))
        key = idempotency_key(request.headers.get("Idempotency-Key"))
        req = dataclasses.replace(req, idempotency_key=key)
        render = endpoint.render if req.stream else None
        following = Following(self, principal, render, req.background)
        try:
            admitted = await self.parts.admission.submit(
                principal, req, following, context=following.describe(req)
            )
        except GatewayError as err:
            raise from_refusal(err, req) from None
        request[REQUEST_ID] = admitted.request_id
        if admitted.existing:
            # An idempotent resubmit: the request that holds the key, from its start.
            meta, ctx = await self._find(principal, admitted.request_id, endpoint)
            if ctx.api != req.api:
                raise invalid_value("Idempotency-Key", "belongs to another kind of request")
            if req.background and not req.stream:
                return await self._snapshot(request, principal, meta, ctx)
            await following.resume(meta, ctx, -1)
        if req.stream:
            return await self._stream(request, following)
        made = following.ctx
        assert made is not None
        if req.background:  # answered at once; it runs whoever follows it
            following.close()
            return _json(request, response_object(made, None))
        return _json(request, endpoint.body(made, await following.answer(request)))

    async def _stream(self, request: web.Request, following: Following) -> web.StreamResponse:
        self.streams.add(following)
        try:
            return await following.stream(request)
        finally:
            self.streams.discard(following)

    # ---- existing requests -------------------------------------------------------------------

    def _resumer(self, endpoint: Endpoint) -> Handler:
        async def resume(request: web.Request) -> web.StreamResponse:
            principal = await self._principal(request)
            self._limit(principal, "resume")
            request_id = request.match_info["request_id"]
            after = sse.last_event_position(request.headers.get("Last-Event-ID"), request_id)
            meta, ctx = await self._find(principal, request_id, endpoint)
            return await self._resume(request, principal, meta, ctx, endpoint, after)

        return resume

    async def _resume(
        self,
        request: web.Request,
        principal: auth.Principal,
        meta: RequestMeta,
        ctx: StreamContext,
        endpoint: Endpoint,
        after: int,
    ) -> web.StreamResponse:
        if self.parts.draining():  # the stream would end at once: resume on another replica
            raise errors.draining()
        following = Following(self, principal, endpoint.render, meta.background)
        await following.resume(meta, ctx, after)
        return await self._stream(request, following)

    async def retrieve_response(self, request: web.Request) -> web.StreamResponse:
        principal = await self._principal(request)
        self._limit(principal, "resume")  # a retrieve replays the request's events too
        request_id = request_id_of(request.match_info["response_id"])
        query = request.query
        stream = query_flag(query.get("stream"), "stream")
        meta, ctx = await self._find(principal, request_id, RESPONSES)
        if not stream:
            return await self._snapshot(request, principal, meta, ctx)
        raw = query.get("starting_after")
        after = (
            starting_after(raw)
            if raw is not None
            else sse.last_event_position(request.headers.get("Last-Event-ID"), request_id)
        )
        return await self._resume(request, principal, meta, ctx, RESPONSES, after)

    async def cancel_response(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        request_id = request_id_of(request.match_info["response_id"])
        self._limit(principal, "cancel")
        meta, ctx = await self._find(principal, request_id, RESPONSES)
        # An ended or already cancelled request is answered from its events, nothing written.
        await self.parts.cancels.cancel(meta)
        return await self._snapshot(request, principal, meta, ctx, CANCEL_WAIT_S)

    async def _snapshot(
        self,
        request: web.Request,
        principal: auth.Principal,
        meta: RequestMeta,
        ctx: StreamContext,
        wait_s: float = 0.0,
    ) -> web.Response:
        """The response object as the request's events say now (replayed on any replica)."""
        following = Following(self, principal, None, meta.background)
        await following.resume(meta, ctx, -1, attach=False)
        state = await following.snapshot(wait_s)
        return _json(request, response_object(ctx, state))

    async def _find(
        self, principal: auth.Principal, request_id: str, endpoint: Endpoint
    ) -> tuple[RequestMeta, StreamContext]:
        """The tenant's request of this endpoint and its recorded context; another tenant's,
        or one that was not made here (a WebSocket request has no OpenAI context), is a 404."""
        missing = not_found(f"No {endpoint.noun} found with id '{request_id}'.")
        meta = await self.parts.store.lookup(principal.tenant_id, request_id)
        if meta is None or not meta.context:
            raise missing
        try:
            ctx = StreamContext.loads(meta.context)
        except ValueError:
            raise missing from None
        if ctx.api != endpoint.api:
            raise missing
        return meta, ctx

    # ---- who asks ----------------------------------------------------------------------------

    def _limit(self, principal: auth.Principal, frame: str) -> None:
        """The tenant's rate limit of cancels and resumes (gateway/limits.py), as the
        WebSocket's frames have it."""
        wait_ms = self.parts.limits.take(principal.tenant_id)
        if wait_ms:
            self.parts.metrics.rate_limited[frame] += 1
            raise errors.rate_limited(frame, wait_ms)

    async def _principal(self, request: web.Request) -> auth.Principal:
        headers = request.headers
        s = self.parts.settings
        if not auth.origin_allowed(
            headers.get("Origin"), s.origins, headers.get("Host"), tls=bool(s.tls_cert)
        ):
            raise OpenAIError(403, "Requests from this origin are not allowed.", code="forbidden")
        principal = await self.parts.authenticator.principal(
            headers.get("Authorization"), headers.get("Cookie")
        )
        if principal is None:
            raise OpenAIError(
                401, "Missing or invalid API key (Authorization: Bearer lsk_…).",
                code="invalid_api_key",
            )  # fmt: skip
        return principal


def add_routes(app: web.Application, parts: Parts) -> None:
    """The gateway's route provider (gateway/server.py `ROUTE_PROVIDERS`)."""
    OpenAIRoutes(parts).add_to(app)
