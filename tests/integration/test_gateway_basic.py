"""Gateway against real Kafka/Redis/PostgreSQL with a fake worker: protocol, tokens, errors."""

from __future__ import annotations

import json

import pytest

from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration


topics = testing.topics_fixture(4)
new_key = testing.new_key


async def test_submit_streams_exact_tokens_and_malformed_frames(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-a", [0, 1, 2, 3])
    _tenant, key = await new_key()
    async with testing.running(s) as gw, FakeWorker(topics):
        c = await Client.connect(s.port, key)
        await c.wait(lambda: c.hello is not None)
        for i in range(3):
            await c.submit(f"r{i}", max_tokens=12)
        await c.wait(lambda: len([x for x in c.streams.values() if x.done]) == 3)
        for i in range(3):
            rid = c.by_ref[f"r{i}"]["request_id"]
            st = c.streams[rid]
            assert [q for q, _ in st.tokens] == list(range(1, 13))
            assert st.text == "".join(testing.token_text(rid, q) for q in range(1, 13))
            assert st.done is not None and st.done["finish_reason"] == "length"
            assert st.done["usage"]["completion_tokens"] == 12
            assert st.done["metrics"]["ttft_ms"] is not None
        # Malformed frames: each answered with invalid_request naming the field.
        bad: list[tuple[str, str]] = [
            ("{not json", "frame"),
            ("[1,2]", "frame"),
            (json.dumps({"type": "launch"}), "type"),
            (
                json.dumps({"type": "submit", "model": "m", "max_tokens": "5", "prompt": "x"}),
                "max_tokens",
            ),
            (json.dumps({"type": "submit", "model": "m", "max_tokens": 5}), "prompt"),
            (json.dumps({"type": "submit", "model": 3, "max_tokens": 5, "prompt": "x"}), "model"),
            (json.dumps({"type": "resume", "request_id": "x", "after_seq": -1}), "after_seq"),
            (
                json.dumps(
                    {"type": "submit", "model": "m", "max_tokens": 5, "prompt": "x" * 100_000}
                ),
                "frame",
            ),
        ]
        before = len(c.errors)
        for frame, _ in bad:
            await c.send(frame)
        await c.wait(lambda: len(c.errors) >= before + len(bad))
        got = c.errors[before:]
        assert [e["code"] for e in got] == ["invalid_request"] * len(bad)
        assert [e["field"] for e in got] == [f for _, f in bad]
        assert not any("Traceback" in e["message"] for e in got)
        await c.ws.send(b"\x00binary")
        await c.send({"type": "ping", "data": 7})
        await c.wait(lambda: any(f.get("type") == "pong" for f in c.frames))
        # Still works after all that.
        await c.submit("after", max_tokens=3)
        rid = (await c.wait_ref("after"))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None)
        assert gw.consumer_assignment() == {0, 1, 2, 3}
        await c.close()
