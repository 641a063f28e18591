"""Prefix affinity vs round robin on two real vLLM model servers (docs/scheduling.md).

    llmstream bench prefix-affinity [--pa-requests 20] [--pa-prompts 5] [--pa-system-chars 2000]
                                    [--pa-tokens 8]

Two `llmstream model-server --engine vllm` replicas (SmolLM2-135M-Instruct, `make vllm`; vLLM's
automatic prefix caching is on by default), each with its /metrics. Requests are chat prompts:
one of `--pa-prompts` long system prompts (`--pa-system-chars` characters) and a short question,
the system prompts taking turns, sent one after another straight to a replica over gRPC. The
replica is chosen by the worker's own `Router` (worker.routing), two ways:

- **affinity**: `Router.pick` with the request's `prefix_key` (what the worker does);
- **round robin**: `Router.pick` without a key (least loaded; one request at a time, so the
  replicas simply alternate, and every system prompt meets both replicas).

Each way uses its own system prompts, so the first cannot warm the cache for the second.
Reported per way: vLLM's prefix-cache hits / queries (tokens; the `vllm:prefix_cache_hits` and
`vllm:prefix_cache_queries` counters of both replicas, the difference over the way's
requests) and the client's TTFT (first delta) p50 and mean (the mean carries the misses: with
most requests hitting either way, the p50 is a hit in both). Goal: affinity hits more of the
cache than round robin. Needs `make vllm`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc

from llmstream.ports import free_port
from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.bench.loadgen import check, quantile
from llmstream_tools.testing.worker import wait_model_server
from model_server import vllm_env
from worker.routing import Router, prefix_key

COUNTERS = ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries")
FILLER = (
    "Answer politely, cite the relevant policy section, never promise refunds the policy does "
    "not allow, and keep every answer under one hundred words. "
)


def add_arguments(group: Any) -> None:
    group.add_argument("--pa-requests", type=int, default=20)
    group.add_argument("--pa-prompts", type=int, default=5, help="distinct system prompts")
    group.add_argument("--pa-system-chars", type=int, default=2000)
    group.add_argument("--pa-tokens", type=int, default=8, help="max_tokens per request")


@contextlib.asynccontextmanager
async def vllm_replica() -> AsyncIterator[tuple[str, int]]:
    """A vLLM model server process: (gRPC address, metrics port) once it lists its model."""
    port, metrics_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmstream_tools.cli", "model-server", "--engine=vllm",
        f"--port={port}", f"--metrics-port={metrics_port}", "--log-level=WARNING",
        "--max-concurrency=2", "--max-context=2048",
    )  # fmt: skip
    try:
        addr = f"127.0.0.1:{port}"
        await wait_model_server(addr, within_s=600)  # vLLM loads in 10-40 s here
        yield addr, metrics_port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def cache_counters(metrics_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    found = dict.fromkeys(COUNTERS, 0.0)
    seen = set()
    for line in text.splitlines():
        for name in COUNTERS:
            # `vllm:prefix_cache_hits_total{...} 123.0` (one series per engine)
            if line.startswith((name + "_total{", name + "_total ", name + "{", name + " ")):
                found[name] += float(line.rsplit(" ", 1)[1])
                seen.add(name)
    missing = set(COUNTERS) - seen
    if missing:
        raise RuntimeError(f"the model server's /metrics has no {sorted(missing)}")
    return found


async def ttft(stub: Any, start: model_service_pb2.GenerateStart) -> float:
    """Seconds to the first delta; reads the stream to its end."""
    t0 = time.monotonic()
    first: float | None = None
    call = stub.Generate()
    await call.write(model_service_pb2.GenerateRequest(start=start))
    await call.done_writing()
    async for msg in call:
        kind = msg.WhichOneof("kind")
        if kind == "delta" and first is None:
            first = time.monotonic() - t0
        if kind == "finish" and first is None:
            raise RuntimeError(f"request ended without a token: {msg.finish}")
    if first is None:
        raise RuntimeError("the stream ended without a finish")
    return first


async def one_way(
    name: str,
    args: argparse.Namespace,
    replicas: list[tuple[str, int]],
    stubs: dict[str, Any],
    model: str,
) -> dict[str, Any]:
    router = Router([addr for addr, _ in replicas])
    systems = [
        f"[{name} #{k}] You are the support assistant of shop number {k}. "
        + FILLER * (args.pa_system_chars // len(FILLER) + 1)
        for k in range(args.pa_prompts)
    ]
    systems = [s[: args.pa_system_chars] for s in systems]
    before = [await asyncio.to_thread(cache_counters, m) for _, m in replicas]
    times: list[float] = []
    placed: dict[str, set[str]] = {}
    for i in range(args.pa_requests):
        system = systems[i % len(systems)]
        prompt = common_pb2.Prompt(
            chat=common_pb2.ChatPrompt(
                messages=[
                    common_pb2.ChatMessage(role="system", content=system),
                    common_pb2.ChatMessage(role="user", content=f"Question {i}: where is it?"),
                ]
            )
        )
        key = prefix_key(model, prompt) if name == "affinity" else None
        replica = router.pick(time.monotonic(), key=key)
        placed.setdefault(system[:12], set()).add(replica)
        start = model_service_pb2.GenerateStart(
            request_id=f"pa-{name}-{i}",
            model=model,
            prompt=prompt,
            sampling=common_pb2.SamplingParams(temperature=0.0),
            max_tokens=args.pa_tokens,
        )
        router.acquire(replica)
        try:
            times.append(await ttft(stubs[replica], start))
        finally:
            router.release(replica)
    after = [await asyncio.to_thread(cache_counters, m) for _, m in replicas]
    hits = sum(a[COUNTERS[0]] - b[COUNTERS[0]] for a, b in zip(after, before, strict=True))
    queries = sum(a[COUNTERS[1]] - b[COUNTERS[1]] for a, b in zip(after, before, strict=True))
    ordered = sorted(times)
    return {
        "requests": len(times),
        "prefix_cache_hits": int(hits),
        "prefix_cache_queries": int(queries),
        "hit_rate": round(hits / queries, 3) if queries else 0.0,
        "ttft_p50_ms": round(quantile(ordered, 0.5) * 1000, 1),
        "ttft_mean_ms": round(statistics.fmean(times) * 1000, 1),
        "replicas_per_system_prompt": round(statistics.fmean(len(v) for v in placed.values()), 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not vllm_env.vllm_importable() and not os.access(vllm_env.vllm_python(), os.X_OK):
        raise RuntimeError(f"the prefix-affinity suite needs vLLM: {vllm_env.INSTALL_HINT}")
    result: dict[str, Any] = {"load_average_at_start": os.getloadavg(), "ways": {}}
    async with vllm_replica() as r0, vllm_replica() as r1:
        replicas = [r0, r1]
        channels = {addr: grpc.aio.insecure_channel(addr) for addr, _ in replicas}
        try:
            stubs = {a: model_service_pb2_grpc.ModelServiceStub(c) for a, c in channels.items()}
            listed = await stubs[r0[0]].ListModels(
                model_service_pb2.ListModelsRequest(), timeout=10
            )
            model = listed.models[0].name
            for name in ("affinity", "round robin"):
                result["ways"][name] = await one_way(name, args, replicas, stubs, model)
                print(f"{name}: {result['ways'][name]}", file=sys.stderr, flush=True)
        finally:
            for channel in channels.values():
                await channel.close()
    aff, rr = result["ways"]["affinity"], result["ways"]["round robin"]
    what = (
        f"{args.pa_requests} requests, {args.pa_prompts} system prompts of "
        f"{args.pa_system_chars} chars, 2 vLLM replicas"
    )
    result["facts"] = [
        {
            "what": f"prefix-cache hits / queries (tokens); TTFT p50 / mean, {name} ({what})",
            "value": f"{r['prefix_cache_hits']} / {r['prefix_cache_queries']} "
            f"({r['hit_rate']:.0%}); {r['ttft_p50_ms']} / {r['ttft_mean_ms']} ms",
        }
        for name, r in (("affinity", aff), ("round robin", rr))
    ]
    result["goals"] = [
        check(
            "prefix affinity: more prefix-cache hits than round robin on 2 vLLM replicas",
            aff["hit_rate"] > rr["hit_rate"],
            f"{aff['hit_rate']:.0%} vs {rr['hit_rate']:.0%}; TTFT mean {aff['ttft_mean_ms']} vs "
            f"{rr['ttft_mean_ms']} ms",
        )
    ]
    return result
