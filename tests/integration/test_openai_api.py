"""The OpenAI-compatible API against the real pipeline, read by the official `openai` Python SDK:
two gateway replicas, two workers, the synthetic model server, the aggregator, on real Kafka,
PostgreSQL and Redis (llmstream_tools/stack.py). Outcomes are judged (text, finish reasons,
counts, the ledger), never timings."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import psycopg
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.responses import ResponseCreatedEvent

from llmstream_tools.stack import Stack, local_stack
from llmstream_tools.testing.gateway import Client
from tests.integration.test_openai_js_sdk import run_js

pytestmark = pytest.mark.integration

MODEL = "synthetic"
MODEL_MAX_TOKENS = 1024  # the synthetic model server's default limit
PROMPT = "Tell me about rivers."
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
# Long enough to act while it runs: 400 tokens at 10 ms.
LONG = 400


@dataclass
class Api:
    stack: Stack
    tenant_id: str
    key: str
    # Request id -> (prompt, completion) tokens the client was told: the ledger must agree.
    billed: dict[str, tuple[int, int]] = field(default_factory=dict)

    def client(self, replica: int = 0, key: str | None = None, **kw: Any) -> openai.AsyncOpenAI:
        port = self.stack.gateway_ports[replica]
        return openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key=key or self.key,
            max_retries=0,
            timeout=60,
            **kw,
        )


@pytest.fixture(scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    tmp = tmp_path_factory.mktemp("openai")
    env = {"LLMSTREAM_GATEWAY_GRACE_S": "2", "LLMSTREAM_CATALOG_ANNOUNCE_S": "2"}
    async with local_stack(tmp, gateways=2, itl_ms=10, extra_env=env) as stack:
        tenant_id, key = await stack.tenant_key("standard")
        a = Api(stack, tenant_id, key)
        for replica in (0, 1):
            await wait_for_model(a.client(replica))
        yield a


async def wait_for_model(client: openai.AsyncOpenAI) -> None:
    """Workers announce the model within one interval of starting: await the catalog."""
    for _ in range(600):
        if MODEL in [m.id async for m in client.models.list()]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{MODEL} never listed")


async def restart(api: Api, replica: int) -> None:
    """Start gateway replica `replica` again; return once it serves the model."""
    api.stack.start(f"gateway-{replica}")
    url = f"http://127.0.0.1:{api.stack.gateway_ports[replica]}/readyz"
    async with aiohttp.ClientSession() as http:
        status = "not started"
        for _ in range(600):
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        break
                    status = f"readyz {r.status}"
            except aiohttp.ClientConnectionError:
                status = "not listening yet"
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"gateway-{replica} never became ready ({status})")
    await wait_for_model(api.client(replica))


async def chat_stream(client: openai.AsyncOpenAI, **kw: Any) -> tuple[str, list[Any]]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}, **kw
    )
    chunks = [c async for c in stream]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


async def ws_text(api: Api, seed: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """The same request over the WebSocket protocol."""
    ws = await Client.connect(api.stack.gateway_port, api.key)
    try:
        await ws.submit("r", max_tokens=max_tokens, prompt=None, messages=HI, seed=seed)
        accepted = await ws.wait_ref("r")
        rid = accepted["request_id"]
        await ws.wait(lambda: ws.streams[rid].done is not None, 60)
        stream = ws.streams[rid]
        assert stream.done is not None
        return stream.text, stream.done
    finally:
        await ws.close()


# ---- models and generating ---------------------------------------------------------------------


async def test_models_list_is_the_catalog(api: Api) -> None:
    models = [m async for m in api.client().models.list()]
    [synthetic] = [m for m in models if m.id == MODEL]
    assert synthetic.owned_by == "llmstream"
    assert synthetic.model_extra is not None
    assert synthetic.model_extra["max_tokens"] == MODEL_MAX_TOKENS
    assert (await api.client(1).models.retrieve(MODEL)).id == MODEL


async def test_chat_stream_with_usage_equals_the_websocket_for_the_same_seed(api: Api) -> None:
    text, chunks = await chat_stream(api.client(), max_tokens=24, seed=11)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens == 24
    rid = chunks[0].id.removeprefix("chatcmpl-")
    api.billed[rid] = (usage.prompt_tokens, usage.completion_tokens)
    ws, done = await ws_text(api, seed=11, max_tokens=24)
    assert text == ws and text
    assert done["usage"] == {"prompt_tokens": usage.prompt_tokens, "completion_tokens": 24}


async def test_chat_without_streaming(api: Api) -> None:
    raw = await api.client(1).chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_completion_tokens=12, seed=3
    )
    body = raw.parse()
    assert raw.headers["x-request-id"] == body.id.removeprefix("chatcmpl-")
    assert body.choices[0].finish_reason == "length"
    assert body.choices[0].message.role == "assistant" and body.choices[0].message.content
    assert body.usage is not None and body.usage.completion_tokens == 12
    api.billed[raw.headers["x-request-id"]] = (body.usage.prompt_tokens, 12)
    streamed, _ = await chat_stream(api.client(), max_tokens=12, seed=3)
    assert streamed == body.choices[0].message.content


async def test_max_tokens_left_out_is_the_models_limit(api: Api) -> None:
    body = await api.client().chat.completions.create(
        model=MODEL, messages=HI, stop=["e"], seed=5, temperature=1.0
    )
    # The stop string ends it long before the limit: an answer, not a refusal.
    assert body.choices[0].finish_reason == "stop"


async def test_completions_stream_and_not(api: Api) -> None:
    client = api.client()
    body = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, seed=2)
    assert body.choices[0].finish_reason == "length" and body.usage is not None
    assert body.usage.completion_tokens == 10
    stream = await client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=10, seed=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == body.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


async def test_idempotency_key_answers_with_the_same_request(api: Api) -> None:
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = await api.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=8, extra_headers=key
    )
    again = await api.client(1).chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=8, extra_headers=key
    )
    assert first.headers["x-request-id"] == again.headers["x-request-id"]
    assert first.parse().choices[0].message.content == again.parse().choices[0].message.content


async def test_the_javascript_sdk_streams_a_chat_completion(api: Api) -> None:
    port = api.stack.gateway_ports[1]
    code, out = await asyncio.to_thread(
        run_js, f"http://127.0.0.1:{port}/v1", "--model", MODEL,
        "--prompt", PROMPT, "--max-tokens", "16", "--seed", "4", key=api.key,
    )  # fmt: skip
    assert code == 0, out
    assert (out["role"], out["finish_reason"]) == ("assistant", "length")
    assert out["usage"]["completion_tokens"] == 16
    ws, _ = await ws_text(api, seed=4, max_tokens=16)
    assert out["text"] == ws


# ---- errors ------------------------------------------------------------------------------------


async def test_invalid_requests_are_400_naming_the_param(api: Api) -> None:
    client = api.client()
    with pytest.raises(openai.BadRequestError) as n:
        await client.chat.completions.create(model=MODEL, messages=HI, n=2)
    assert (n.value.status_code, n.value.param, n.value.code) == (400, "n", "unsupported_parameter")
    with pytest.raises(openai.BadRequestError) as over:
        await client.chat.completions.create(
            model=MODEL, messages=HI, max_completion_tokens=MODEL_MAX_TOKENS + 1
        )
    assert over.value.param == "max_completion_tokens" and over.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as legacy:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=MODEL_MAX_TOKENS + 1)
    assert legacy.value.param == "max_tokens"


async def test_unknown_model_is_404_on_both_protocols(api: Api) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await api.client().chat.completions.create(model="no-such-model", messages=HI)
    assert (err.value.code, err.value.param) == ("model_not_found", "model")
    ws = await Client.connect(api.stack.gateway_port, api.key)
    try:
        await ws.submit("x", model="no-such-model")
        refusal = await ws.wait_ref("x")
        assert (refusal["type"], refusal["code"]) == ("error", "model_not_found")
        # Above the model's limit, the WebSocket caps and says so.
        await ws.submit("y", max_tokens=MODEL_MAX_TOKENS + 1)
        accepted = await ws.wait_ref("y")
        assert (accepted["max_tokens"], accepted["max_tokens_capped"]) == (
            MODEL_MAX_TOKENS,
            "model",
        )
    finally:
        await ws.close()


async def test_bad_key_is_401_and_foreign_origin_403(api: Api) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        await api.client(key="lsk_nope_nope").models.list()
    assert err.value.code == "invalid_api_key"
    foreign = api.client(default_headers={"Origin": "https://evil.example"})
    with pytest.raises(openai.PermissionDeniedError):
        await foreign.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)


async def test_another_tenants_request_is_404(api: Api) -> None:
    stream = await api.client().responses.create(
        model=MODEL, input="hello", max_output_tokens=4, stream=True
    )
    created, *_ = [e async for e in stream]  # read to its end: the request is over
    assert isinstance(created, ResponseCreatedEvent)
    rid = created.response.id
    _, other_key = await api.stack.tenant_key("standard")
    other = api.client(key=other_key)
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(rid)
    with pytest.raises(openai.NotFoundError):
        await other.responses.cancel(rid)
    # The chat resume route of a response id's request: not this tenant's either.
    port = api.stack.gateway_ports[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions/{rid.removeprefix('resp_')}/stream"
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Authorization": f"Bearer {other_key}"}) as r,
    ):
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"


async def test_quota_is_429_with_retry_after(api: Api) -> None:
    async with await psycopg.AsyncConnection.connect(
        api.stack.database_url, autocommit=True
    ) as conn:
        await conn.execute(
            "INSERT INTO quota_tiers VALUES ('one-rpm', 1, 1000000, 1000000, 4, 64, 8)"
            " ON CONFLICT DO NOTHING"
        )
    _, key = await api.stack.tenant_key("one-rpm")
    client = api.client(key=key)
    await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert err.value.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1


# ---- Responses ---------------------------------------------------------------------------------


async def test_background_response_resumed_after_killing_its_gateway(api: Api) -> None:
    first = await api.client(1).responses.create(
        model=MODEL, input="a long story", max_output_tokens=LONG, temperature=0,
        stream=True, background=True,
    )  # fmt: skip
    got: list[Any] = []
    async for event in first:
        got.append(event)
        if event.type == "response.output_text.delta" and len(got) > 20:
            break
    response_id = got[0].response.id
    assert got[0].type == "response.created" and got[0].response.status == "queued"
    # kill -9 the replica that served the first part: the response keeps running.
    api.stack.kill("gateway-1")
    try:
        last = got[-1].sequence_number
        rest = await api.client(0).responses.retrieve(response_id, stream=True, starting_after=last)
        more = [e async for e in rest]
    finally:
        await restart(api, 1)
    # Exactly the events of the whole stream, replayed from the start (a token event without
    # text has no event, so numbers may skip; they never repeat or go missing).
    whole = [e async for e in await api.client(0).responses.retrieve(response_id, stream=True)]
    assert [e.sequence_number for e in got + more] == [e.sequence_number for e in whole]
    assert more[0].sequence_number > last
    assert more[-1].type == "response.incomplete"  # max_output_tokens reached
    text = "".join(e.delta for e in got + more if e.type == "response.output_text.delta")
    final = await api.client(0).responses.retrieve(response_id)
    assert final.status == "incomplete" and final.output_text == text
    assert final.usage is not None and final.usage.output_tokens == LONG
    api.billed[response_id.removeprefix("resp_")] = (final.usage.input_tokens, LONG)


async def test_cancel_a_background_response(api: Api) -> None:
    client = api.client()
    created = await client.responses.create(
        model=MODEL, input="a long story", max_output_tokens=LONG, background=True
    )
    assert created.status == "queued" and created.background
    for _ in range(600):  # until it generates
        if (await client.responses.retrieve(created.id)).status == "in_progress":
            break
        await asyncio.sleep(0.05)
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert cancelled.usage is not None and 0 < cancelled.usage.output_tokens < LONG
    api.billed[created.id.removeprefix("resp_")] = (
        cancelled.usage.input_tokens,
        cancelled.usage.output_tokens,
    )


async def test_foreground_stream_abandoned_is_cancelled_after_the_grace(api: Api) -> None:
    stream = await api.client().chat.completions.create(
        model=MODEL, messages=HI, max_tokens=LONG, stream=True
    )
    rid = ""
    async for chunk in stream:
        rid = chunk.id.removeprefix("chatcmpl-")
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    row = await ledger_row(api, rid)
    assert row["status"] == "cancelled" and row["completion_tokens"] < LONG


async def test_sse_and_websocket_follow_one_request_at_once(api: Api) -> None:
    stream = await api.client().chat.completions.create(
        model=MODEL, messages=HI, max_tokens=200, stream=True, seed=9
    )
    chunks = [await anext(stream)]
    rid = chunks[0].id.removeprefix("chatcmpl-")
    ws = await Client.connect(api.stack.gateway_ports[1], api.key)
    try:
        await ws.send({"type": "resume", "request_id": rid, "after_seq": 0})
        chunks += [c async for c in stream]
        await ws.wait(lambda: rid in ws.streams and ws.streams[rid].done is not None, 60)
        sse_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        done = ws.streams[rid].done
        assert done is not None and done["usage"]["completion_tokens"] == 200
        assert ws.streams[rid].text == sse_text
    finally:
        await ws.close()


# ---- resume at the byte level ------------------------------------------------------------------


async def raw_events(
    port: int, method: str, path: str, key: str, body: dict[str, Any] | None = None,
    last_event_id: str | None = None, stop_after: int | None = None,
) -> tuple[list[tuple[str | None, str]], dict[str, str]]:  # fmt: skip
    """A bare HTTP/1.1 client: the (id, data) of each SSE event as the bytes say, until
    `[DONE]` or `stop_after` events (then the connection is dropped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {key}"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    if last_event_id is not None:
        head.append(f"Last-Event-ID: {last_event_id}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    events: list[tuple[str | None, str]] = []
    try:
        status = (await reader.readline()).decode()
        assert " 200 " in status, status
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers["transfer-encoding"] == "chunked"
        buffer = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return events, headers
            buffer += chunk[:-2]
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                lines = [ln for ln in block.decode().split("\n") if not ln.startswith(":")]
                ids = [ln[4:] for ln in lines if ln.startswith("id: ")]
                payload = "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))
                events.append((ids[0] if ids else None, payload))
                if payload == "[DONE]" or len(events) == stop_after:
                    return events, headers
    finally:
        writer.close()


def content(events: list[tuple[str | None, str]]) -> str:
    out = ""
    for _, payload in events:
        if payload != "[DONE]":
            for choice in json.loads(payload)["choices"]:
                out += choice["delta"].get("content") or ""
    return out


async def test_sse_resume_on_the_other_replica_is_exact_to_the_byte(api: Api) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 120, "seed": 21, "stream": True}
    ports, key = api.stack.gateway_ports, api.key
    whole, _ = await raw_events(ports[0], "POST", "/v1/chat/completions", key, body)
    for k in (1, 2, 37):
        part, headers = await raw_events(
            ports[0], "POST", "/v1/chat/completions", key, body, stop_after=k
        )
        rid = headers["x-request-id"]
        last = part[-1][0]
        assert last is not None and last.startswith(rid + ":")
        rest, _ = await raw_events(
            ports[1], "GET", f"/v1/chat/completions/{rid}/stream", key, last_event_id=last
        )
        # Byte for byte the events of the same stream read in one go (here from the start,
        # once it ended), each once; and the text of an uninterrupted run of the same seed
        # (positions count token events, which the worker may coalesce differently per run).
        again, _ = await raw_events(ports[1], "GET", f"/v1/chat/completions/{rid}/stream", key)
        assert part + rest == again
        ids = [i for i, _ in again if i is not None]
        assert len(ids) == len(set(ids))
        assert content(part + rest) == content(whole)
        assert rest[-1][1] == "[DONE]"


async def test_a_draining_replica_answers_503_with_retry_after(api: Api) -> None:
    port = api.stack.gateway_ports[1]
    client = api.client(1)
    # A WebSocket that never answers the close frame keeps the drain going for a moment.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {api.key}\r\n\r\n".encode()
    )
    assert b" 101 " in await reader.readline()
    await client.models.list()  # a pooled connection the requests below reuse
    refused: openai.APIStatusError | None = None
    try:
        api.stack.procs["gateway-1"].send_signal(signal.SIGTERM)
        # Submits one after another: answered normally until the signal is handled, then
        # refused while the replica drains (until it stops listening).
        for _ in range(10_000):
            try:
                await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
            except openai.APIStatusError as err:
                refused = err
                break
    finally:
        writer.close()
        await asyncio.to_thread(api.stack.procs["gateway-1"].wait, 30)
        await restart(api, 1)
    assert refused is not None
    assert (refused.status_code, refused.code) == (503, "service_unavailable")
    assert int(refused.response.headers["retry-after"]) >= 1


# ---- draining and billing ----------------------------------------------------------------------


async def ledger_row(api: Api, request_id: str) -> dict[str, Any]:
    """The request's ledger row once the aggregator wrote it (exactly one per request)."""
    async with await psycopg.AsyncConnection.connect(api.stack.database_url) as conn:
        for _ in range(1200):
            cur = await conn.execute(
                "SELECT status, prompt_tokens, completion_tokens FROM usage_ledger"
                " WHERE request_id = %s",
                (request_id,),
            )
            rows = await cur.fetchall()
            if rows:
                [(status, prompt, completion)] = rows
                return {"status": status, "prompt_tokens": prompt, "completion_tokens": completion}
            await asyncio.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


async def test_the_ledger_has_one_row_per_request_with_its_usage(api: Api) -> None:
    assert len(api.billed) >= 4
    for rid, (prompt, completion) in api.billed.items():
        row = await ledger_row(api, rid)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion), rid
