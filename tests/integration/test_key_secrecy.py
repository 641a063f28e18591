"""API keys (and browser session ids) never appear in logs, events, traces or error messages.

Real processes (`local_stack`) at LLMSTREAM_LOG_LEVEL=DEBUG with every span written to a file
(LLMSTREAM_TRACES_FILE). The test uses a valid key every way a client can (bearer socket,
HTTP, sign-in, cookie socket, sign-out), presents malformed, unknown, wrong-secret and revoked
keys, and makes requests fail in the worker and model server; then it greps every process's
log, the traces, every record of every topic, and every frame and HTTP response it received
for each key, each key's secret part and each session id.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from llmstream import apikeys, config, kafka
from llmstream_tools import stack
from llmstream_tools.testing.gateway import Client

pytestmark = pytest.mark.integration

PREFIX = len("lsk_") + 12 + 1  # lsk_<id>_ : the rest is the secret


def _http(url: str, method: str, headers: dict[str, str]) -> tuple[int, str, str]:
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, str(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, str(exc.headers), exc.read().decode()


async def topic_bytes(bootstrap: str, topics: dict[str, int]) -> bytes:
    """Every value, key and header of every record of `topics` (name -> partitions)."""
    consumer = AIOKafkaConsumer(**kafka.Connection(bootstrap).client_kwargs("test"), group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out = bytearray()
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    out += (r.value or b"") + (r.key or b"")
                    for k, v in r.headers or ():
                        out += k.encode() + v
        return bytes(out)
    finally:
        await consumer.stop()


async def test_keys_and_sessions_never_leak(tmp_path: Path) -> None:
    traces = tmp_path / "traces.jsonl"
    env = {
        "LLMSTREAM_LOG_LEVEL": "DEBUG",
        "LLMSTREAM_TRACES_FILE": str(traces),
        "LLMSTREAM_GATEWAY_AUTH_CACHE_S": "1",
    }
    received: list[str] = []  # every frame and HTTP response a client saw

    async def http(path: str, method: str = "GET", **headers: str) -> int:
        status, hdrs, body = await asyncio.to_thread(
            _http, f"http://127.0.0.1:{st.gateway_port}{path}", method, headers
        )
        received.append(body)
        received.append(hdrs.replace(session_cookie(hdrs), ""))  # its own cookie: expected
        return status

    async with stack.local_stack(tmp_path, workers=1, extra_env=env) as st:
        _tenant, key = await st.tenant_key("standard")
        _t2, revoked = await st.tenant_key("standard")
        wrong_secret = key[:PREFIX] + apikeys.generate().key[PREFIX:]
        unknown = apikeys.generate().key
        malformed = "lsk_" + key[PREFIX:]
        bad_keys = [wrong_secret, unknown, malformed, revoked + "x"]
        url = f"ws://127.0.0.1:{st.gateway_port}/ws"

        # A valid key, every way.
        c = await Client.connect(st.gateway_port, key)
        await c.submit("ok", max_tokens=5)
        # Refused by the gateway once it has read the model catalog, else fails in the worker.
        await c.submit("no-model", max_tokens=5, model="no-such-model")
        await c.submit("overflow", max_tokens=5, prompt="x" * 5000)  # fails in the model server
        answers = [await c.wait_ref(r, 20) for r in ("ok", "no-model", "overflow")]
        assert answers[1]["type"] == "accepted" or answers[1]["code"] == "model_not_found"
        rids = [a["request_id"] for a in answers if a["type"] == "accepted"]
        await c.wait(lambda: all(c.streams[r].done is not None for r in rids), 30)
        assert await http(f"/v1/requests/{rids[0]}", Authorization=f"Bearer {key}") == 200
        status, hdrs, _ = await asyncio.to_thread(
            _http,
            f"http://127.0.0.1:{st.gateway_port}/v1/sessions",
            "POST",
            {"Authorization": f"Bearer {key}"},
        )
        assert status == 200
        cookie = session_cookie(hdrs)
        session_id = cookie.split("=", 1)[1]
        browser = Client(await connect(url, additional_headers={"Cookie": cookie}))
        await browser.submit("cookie", max_tokens=3)
        rid = (await browser.wait_ref("cookie", 20))["request_id"]
        await browser.wait(lambda: browser.streams[rid].done is not None, 30)
        assert await http(f"/v1/requests/{rid}", Cookie=cookie) == 200
        assert await http("/v1/sessions", "DELETE", Cookie=cookie) == 200

        # Keys that do not work, in every place a key goes.
        for bad in bad_keys:
            for header in (f"Bearer {bad}", f"bearer  {bad} ", f"Basic {bad}"):
                with pytest.raises(InvalidStatus) as exc:
                    await connect(url, additional_headers={"Authorization": header})
                assert exc.value.response.status_code == 401
                received.append(exc.value.response.body.decode())
                assert await http(f"/v1/requests/{rids[0]}", Authorization=header) == 401
                assert await http("/v1/sessions", "POST", Authorization=header) == 401
        # A key revoked while its socket is open.
        r = await Client.connect(st.gateway_port, revoked)
        await r.wait(lambda: r.hello is not None)
        with psycopg.connect(st.database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE id = %s",
                (apikeys.key_id_of(revoked),),
            )
        await asyncio.sleep(1.2)
        await r.submit("after-revoke", max_tokens=2)
        await r.wait(lambda: r.close_code is not None)
        assert r.errors and r.errors[-1]["code"] == "unauthorized"
        for client in (c, browser, r):
            received.extend(json.dumps(f, ensure_ascii=False) for f in client.frames)
            await client.close()

        events = await topic_bytes(
            config.kafka_bootstrap(),
            {st.prompts_topic: 4, st.tokens_topic: 4, st.env["LLMSTREAM_TOPIC_DLQ"]: 1},
        )
    logs = read_logs(tmp_path)
    assert set(logs) >= {"gateway.log", "worker-0.log", "aggregator.log", "model-server.log"}
    assert any('"level": "debug"' in text for text in logs.values())  # DEBUG was on
    spans = traces.read_text() if traces.exists() else ""
    secrets: dict[str, str] = {}
    for name, k in [("key", key), ("revoked", revoked)] + [
        (f"bad{i}", b) for i, b in enumerate(bad_keys)
    ]:
        secrets[name] = k
        secrets[f"{name} secret"] = k[PREFIX:]
    secrets["session"] = session_id
    places: dict[str, Any] = {
        **logs,
        "traces": spans,
        "events": events,
        "responses": "\n".join(received),
    }
    leaks = [
        f"{what} in {where}"
        for what, secret in secrets.items()
        for where, text in places.items()
        if (secret.encode() in text if isinstance(text, bytes) else secret in text)
    ]
    assert leaks == []
    assert "Bearer" not in logs["gateway.log"] and "llmstream_session" not in logs["gateway.log"]


def read_logs(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in directory.glob("*.log")}


def session_cookie(headers: str) -> str:
    """`llmstream_session=<id>` from a Set-Cookie header in `headers`, or ""."""
    for line in headers.splitlines():
        if line.lower().startswith("set-cookie:") and "llmstream_session=" in line:
            return line.split(":", 1)[1].strip().split(";")[0]
    return ""
