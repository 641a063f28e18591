"""The OpenAI routes' refusals over real HTTP (aiohttp's test server) with in-memory parts: every
refusal is OpenAI's error body with its status and headers, whichever layer refused (auth,
parsing, the admission, the request store, draining). The whole pipeline: the integration
tests (tests/integration/test_openai_api.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import errors
from gateway.admission import SubmitRequest
from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.limits import FrameLimits
from gateway.metrics import GatewayMetrics
from gateway.openai.api_router import add_routes
from gateway.openai.protocol import StreamContext
from gateway.quota import Limits
from gateway.server import Parts
from gateway.settings import Settings
from gateway.store import ReplyRoute, RequestMeta
from llmstream.catalog import ModelEntry

KEY = "lsk_good"
PRINCIPAL = Principal("t1", "k1", Limits("standard", 60, 10_000, 100_000, 4, 100, 8))
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ENTRY = ModelEntry("m", "1", "synthetic", 2048, 64, 4, ("ms:1",), "w0", 1_700_000_000_000, 10_000)


class FakeAuth:
    async def principal(self, authorization: str | None, cookie: str | None) -> Principal | None:
        return PRINCIPAL if authorization == f"Bearer {KEY}" else None


@dataclass
class FakeAdmission:
    refusal: GatewayError | None = None
    seen: list[SubmitRequest] = field(default_factory=list)

    async def submit(self, principal: Principal, req: SubmitRequest, *rest: Any, **kw: Any) -> Any:
        self.seen.append(req)
        assert self.refusal is not None  # these tests never admit
        raise self.refusal


@dataclass
class FakeStore:
    meta: dict[tuple[str, str], RequestMeta] = field(default_factory=dict)

    async def lookup(self, tenant_id: str, request_id: str) -> RequestMeta | None:
        return self.meta.get((tenant_id, request_id))


class FakeModels:
    def served(self) -> list[ModelEntry]:
        return [ENTRY]

    def get(self, model: str) -> ModelEntry | None:
        return ENTRY if model == "m" else None


@dataclass
class FakeParts:
    settings: Settings = field(default_factory=lambda: Settings(gateway_id="gw-test"))
    authenticator: FakeAuth = field(default_factory=FakeAuth)
    admission: FakeAdmission = field(default_factory=FakeAdmission)
    store: FakeStore = field(default_factory=FakeStore)
    models: FakeModels = field(default_factory=FakeModels)
    limits: FrameLimits = field(default_factory=lambda: FrameLimits(time.monotonic))
    metrics: GatewayMetrics = field(
        default_factory=lambda: GatewayMetrics("test-openai-routes", lambda: 0, lambda: 0)
    )
    is_draining: bool = False

    def draining(self) -> bool:
        return self.is_draining


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[FakeParts, TestClient[web.Request, web.Application]]]:
    parts = FakeParts()
    app = web.Application(client_max_size=1024)
    add_routes(app, cast(Parts, parts))
    async with TestClient(TestServer(app)) as client:
        yield parts, client


Gateway = tuple[FakeParts, TestClient[web.Request, web.Application]]


async def error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body: dict[str, Any] = (await resp.json())["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


async def test_credentials_and_origin(gateway: Gateway) -> None:
    _, client = gateway
    body = await error(await client.get("/v1/models"), 401)
    assert body["code"] == "invalid_api_key"
    foreign = {**AUTH, "Origin": "https://evil.example"}
    body = await error(await client.post("/v1/chat/completions", json=CHAT, headers=foreign), 403)
    assert body["code"] == "forbidden"


async def test_models_are_the_catalogs(gateway: Gateway) -> None:
    _, client = gateway
    listed = await (await client.get("/v1/models", headers=AUTH)).json()
    assert [(m["id"], m["max_tokens"]) for m in listed["data"]] == [("m", 64)]
    body = await error(await client.get("/v1/models/nope", headers=AUTH), 404)
    assert (body["code"], body["param"]) == ("model_not_found", "model")


async def test_bodies_are_checked_before_the_admission(gateway: Gateway) -> None:
    parts, client = gateway
    post = client.post
    body = await error(await post("/v1/chat/completions", data=b"{", headers=AUTH), 400)
    assert body["type"] == "invalid_request_error"
    body = await error(await post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=AUTH), 400)
    assert (body["param"], body["code"]) == ("n", "unsupported_parameter")
    big = {**CHAT, "pad": "x" * 2048}  # above the app's client_max_size
    assert (await error(await post("/v1/completions", json=big, headers=AUTH), 413))["message"]
    long_key = {**AUTH, "Idempotency-Key": "k" * 200}
    body = await error(await post("/v1/chat/completions", json=CHAT, headers=long_key), 400)
    assert body["param"] == "Idempotency-Key"
    assert not parts.admission.seen


@pytest.mark.parametrize(
    ("refusal", "status", "code", "retry_after"),
    [
        (errors.overloaded(), 429, "server_overloaded", "1"),
        (errors.draining(), 503, "service_unavailable", "1"),
        (errors.quota_exceeded("tokens_per_day", 61_500), 429, "rate_limit_exceeded", "62"),
        (errors.model_not_found("m"), 404, "model_not_found", None),
        (errors.model_unavailable("m", 10_000), 503, "model_unavailable", "10"),
    ],
)
async def test_admission_refusals_in_openai_terms(
    gateway: Gateway, refusal: GatewayError, status: int, code: str, retry_after: str | None
) -> None:
    parts, client = gateway
    parts.admission.refusal = refusal
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert (await error(resp, status))["code"] == code
    assert resp.headers.get("Retry-After") == retry_after


async def test_a_max_tokens_refusal_names_the_param_as_sent(gateway: Gateway) -> None:
    parts, client = gateway
    parts.admission.refusal = GatewayError(
        errors.INVALID_REQUEST, "max_tokens is too large", field="max_tokens", reason="model"
    )
    sent = {**CHAT, "max_completion_tokens": 5000}
    body = await error(await client.post("/v1/chat/completions", json=sent, headers=AUTH), 400)
    assert (body["param"], body["code"]) == ("max_completion_tokens", "invalid_value")
    assert parts.admission.seen[0].refuse_over_model_limit  # HTTP refuses, never caps
    sent = {"model": "m", "input": "hi", "max_output_tokens": 5000}
    body = await error(await client.post("/v1/responses", json=sent, headers=AUTH), 400)
    assert body["param"] == "max_output_tokens"


def _meta(request_id: str, context: str = "") -> RequestMeta:
    return RequestMeta(request_id, "t1", ReplyRoute("tokens", 0, 0), 1, "gw", context=context)


async def test_existing_requests_are_the_tenants_and_the_endpoints(gateway: Gateway) -> None:
    parts, client = gateway
    chat = StreamContext("chat", "req_chat", "m", 1, 16).dumps()
    parts.store.meta[("t1", "req_chat")] = _meta("req_chat", chat)
    parts.store.meta[("t1", "req_ws")] = _meta("req_ws")  # a WebSocket request: no context
    get = client.get
    for path in (
        "/v1/chat/completions/req_other/stream",  # unknown, or another tenant's
        "/v1/chat/completions/req_ws/stream",
        "/v1/completions/req_chat/stream",  # a chat completion is no legacy completion
        "/v1/responses/resp_req_chat",
        "/v1/responses/req_chat",  # not a response id
    ):
        assert (await error(await get(path, headers=AUTH), 404))["code"] == "not_found"
    resp = await client.post("/v1/responses/resp_req_chat/cancel", headers=AUTH)
    assert (await error(resp, 404))["code"] == "not_found"
    other = {**AUTH, "Last-Event-ID": "req_else:3"}
    body = await error(await get("/v1/chat/completions/req_chat/stream", headers=other), 400)
    assert body["param"] == "Last-Event-ID"
    parts.is_draining = True  # the stream would end at once: resume on another replica
    body = await error(await get("/v1/chat/completions/req_chat/stream", headers=AUTH), 503)
    assert body["code"] == "service_unavailable"
