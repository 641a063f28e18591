"""`tokens` frames (docs/protocol.md, capability `tokens`) end to end: the real gateway and
worker with a synthetic model server (1 ms per token). A socket that took the capability gets
every seq exactly once and the model's full text, in fewer frames than seqs when it reads
behind the stream (a resume replayed from Kafka); a v1 socket on the same gateway still gets
one `token` frame per seq; a resume from a seq inside what was
one `tokens` frame continues exactly after it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmstream import ports
from llmstream_tools import admin
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing import worker as wt
from llmstream_tools.testing.gateway import Client
from llmstream_tools.testing.worker_fixtures import synthetic_model_server, worker_topics

pytestmark = pytest.mark.integration

PROMPT, N = "tell me a long story", 400


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with synthetic_model_server(tmp_path_factory.mktemp("gms"), itl_ms=1, ttft_ms=0) as addr:
        yield addr


topics = worker_topics


async def _batching(port: int, key: str) -> Client:
    c = await Client.connect(port, key)
    await c.wait(lambda: c.hello is not None)
    assert c.hello is not None and "tokens" in c.hello["capabilities"]
    await c.send({"type": "hello", "capabilities": ["tokens"]})
    return c


def _count(c: Client, rid: str) -> int:
    return len(_frames(c, rid, "token")) + len(_frames(c, rid, "tokens"))


def _frames(c: Client, rid: str, kind: str) -> list[dict[str, object]]:
    return [f for f in c.frames if f.get("request_id") == rid and f["type"] == kind]


async def test_tokens_frames_v1_unchanged_and_resume_inside_a_batch(
    topics: wt.Topics, model_server: str, db_env: str, redis_url: str, tmp_path: Path
) -> None:
    worker = wt.start_worker(tmp_path, topics.env([model_server]), "gw-batch-worker")
    gt = testing.Topics(topics.bootstrap, topics.prompts, topics.tokens, topics.partitions)
    s = testing.settings(gt, redis_url, db_env, "gw-batch", [0, 1, 2])
    name = f"t-{uuid.uuid4().hex[:8]}"
    await admin.create_tenant(name, "enterprise")
    key = (await admin.create_key(name)).key
    try:
        reference, _ids = await wt.reference_text(model_server, PROMPT, N)
        async with testing.running(s):
            batched, v1 = await _batching(s.port, key), await Client.connect(s.port, key)
            for c in (batched, v1):
                await c.submit("a", max_tokens=N, prompt=PROMPT, temperature=0)
            last: dict[str, int] = {}
            for c in (batched, v1):
                rid = (await c.wait_ref("a", 30))["request_id"]
                await c.wait(lambda c=c, rid=rid: c.streams[rid].done is not None, 60)
                stream = c.streams[rid]
                assert stream.done is not None and stream.done["finish_reason"] == "length"
                last[rid] = stream.done["last_seq"]
                assert [q for q, _ in stream.tokens] == list(range(1, last[rid] + 1))
                assert stream.text == reference
            rid_b = batched.by_ref["a"]["request_id"]
            rid_v1 = v1.by_ref["a"]["request_id"]
            # v1: exactly one `token` frame per seq, never a `tokens` frame.
            assert len(_frames(v1, rid_v1, "token")) == last[rid_v1] > 1
            assert not _frames(v1, rid_v1, "tokens")

            # A reader behind the stream (a resume of the whole of it, read from Kafka): what
            # accumulated per wake-up leaves as one frame; every seq exactly once.
            behind = await _batching(s.port, key)
            await behind.send({"type": "resume", "request_id": rid_b, "after_seq": 0})
            await behind.wait(lambda: rid_b in behind.streams, 30)
            await behind.wait(lambda: behind.streams[rid_b].done is not None, 60)
            replayed = behind.streams[rid_b]
            assert [q for q, _ in replayed.tokens] == list(range(1, last[rid_b] + 1))
            assert replayed.text == reference
            batches = _frames(behind, rid_b, "tokens")
            sent = len(batches) + len(_frames(behind, rid_b, "token"))
            print(
                f"\n1 ms/token: tokens capability {last[rid_b]} seqs live in"
                f" {_count(batched, rid_b)} frames, behind in {sent} frames;"
                f" v1 {last[rid_v1]} seqs in {_count(v1, rid_v1)} frames"
            )
            assert batches and sent < last[rid_b]

            # Resume from a seq inside a `tokens` frame (not its last): exactly what follows.
            inside = next(f for f in batches if len(f["texts"]) >= 2)  # type: ignore[arg-type]
            after = int(inside["seq"]) - 1  # type: ignore[call-overload]
            resumed = await _batching(s.port, key)
            await resumed.send({"type": "resume", "request_id": rid_b, "after_seq": after})
            await resumed.wait(lambda: rid_b in resumed.streams, 30)
            await resumed.wait(lambda: resumed.streams[rid_b].done is not None, 60)
            again = resumed.streams[rid_b]
            assert [q for q, _ in again.tokens] == list(range(after + 1, last[rid_b] + 1))
            head = "".join(t for _, t in replayed.tokens[:after])
            assert head + again.text == reference
            for c in (batched, v1, behind, resumed):
                await c.close()
    finally:
        worker.kill()


async def test_paced_stream_takes_the_capability_without_change(
    topics: wt.Topics, db_env: str, redis_url: str, tmp_path: Path
) -> None:
    """Paced like a model (20 ms per token): nothing accumulates between sends, so a socket
    with the capability gets the same stream as a v1 one, token by token."""
    port = ports.free_port()
    paced = wt.start_model_server(tmp_path, port, itl_ms=20, ttft_ms=20)
    addr = f"127.0.0.1:{port}"
    worker = None
    try:
        await wt.wait_model_server(addr)
        worker = wt.start_worker(tmp_path, topics.env([addr]), "gw-paced-worker")
        gt = testing.Topics(topics.bootstrap, topics.prompts, topics.tokens, topics.partitions)
        s = testing.settings(gt, redis_url, db_env, "gw-paced", [0, 1, 2])
        name = f"t-{uuid.uuid4().hex[:8]}"
        await admin.create_tenant(name, "enterprise")
        key = (await admin.create_key(name)).key
        n = 40
        reference, _ids = await wt.reference_text(addr, PROMPT, n)
        async with testing.running(s):
            batched, v1 = await _batching(s.port, key), await Client.connect(s.port, key)
            for c in (batched, v1):
                await c.submit("p", max_tokens=n, prompt=PROMPT, temperature=0)
            counts = []
            for c in (batched, v1):
                rid = (await c.wait_ref("p", 30))["request_id"]
                await c.wait(lambda c=c, rid=rid: c.streams[rid].done is not None, 60)
                stream = c.streams[rid]
                assert stream.done is not None
                last = stream.done["last_seq"]
                assert [q for q, _ in stream.tokens] == list(range(1, last + 1))
                assert stream.text == reference
                counts.append((last, _count(c, rid)))
            print(f"\npaced 20 ms: tokens capability {counts[0]}, v1 {counts[1]} (seqs, frames)")
            assert counts[1][0] == counts[1][1]  # v1: one frame per seq
            assert counts[0][1] <= counts[0][0]
            for c in (batched, v1):
                await c.close()
    finally:
        if worker is not None:
            worker.kill()
        paced.kill()
