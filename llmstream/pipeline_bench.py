"""End-to-end benchmark: the whole pipeline vs the model server alone, measured back to back.

    llmstream bench pipeline [--pipe-streams 1 100 500] [--pipe-tokens 64] [--pipe-repeat 3]

A fresh stack of real processes on fresh topics and a fresh database (synthetic engine with
zero delay, so the model costs nothing and the pipeline's own overhead shows): one model
server, two workers, the aggregator, one gateway. For each concurrency C, closed loop with C
clients, each sending requests one after another:

- direct: C gRPC `Generate` streams straight to the model server;
- pipeline: C WebSockets to the gateway (gateway -> Kafka -> worker -> gRPC -> Kafka -> gateway).

Per request the client records TTFT (send -> first token) and inter-token gaps; per run the
aggregate tokens/s. Each (C, path) runs `--pipe-repeat` times alternating direct/pipeline; the
run with the median tokens/s is reported with min/max. Goals from the issue are printed
PASS/MISS (never fail the command): added TTFT at 100 streams p50 <= 10 ms and p99 <= 30 ms;
end-to-end tokens/s >= 0.6 x direct, and >= 20,000 tokens/s at 500 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from llmstream.stack import Stack, local_stack
from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc


def add_arguments(group: Any) -> None:
    group.add_argument("--pipe-streams", type=int, nargs="+", default=[1, 100, 500])
    group.add_argument("--pipe-tokens", type=int, default=64, help="max_tokens per request")
    group.add_argument(
        "--pipe-requests", type=int, default=2, help="requests per client per run (closed loop)"
    )
    group.add_argument("--pipe-repeat", type=int, default=3, help="runs per (streams, path)")


@dataclass
class Sample:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ttfts = [s.ttft_s * 1000 for s in samples if s.ttft_s is not None]
    gaps = [g * 1000 for s in samples for g in s.gaps_s]
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples),
        "errors": sum(1 for s in samples if s.error),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "ttft_ms": {q: round(_pct(ttfts, p), 2) for q, p in _QUANTILES},
        "itl_ms": {q: round(_pct(gaps, p), 3) for q, p in _QUANTILES},
        "wall_s": round(wall_s, 3),
    }


_QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))


@asynccontextmanager
async def _bench_stack(tmp: Path) -> AsyncIterator[tuple[Stack, str]]:
    """The stack with a zero-delay model and a tenant whose tier never throttles the bench."""
    async with local_stack(
        tmp, partitions=12, ttft_ms=0, itl_ms=0, extra_env={"LLMSTREAM_LOG_LEVEL": "WARNING"}
    ) as stack:
        async with await psycopg.AsyncConnection.connect(
            stack.database_url, autocommit=True
        ) as conn:
            await conn.execute(
                "INSERT INTO quota_tiers VALUES ('bench', 1000000, 1000000000000,"
                " 1000000000000, 100000, 100000, 100000)"
            )
        _, key = await stack.tenant_key("bench")
        yield stack, key


async def _direct_client(
    stub: model_service_pb2_grpc.ModelServiceStub, n: int, tokens: int
) -> list[Sample]:
    out = []
    for _ in range(n):
        sample = Sample()
        start = model_service_pb2.GenerateStart(
            request_id=uuid.uuid4().hex,
            model="synthetic",
            prompt=common_pb2.Prompt(text=f"bench {uuid.uuid4().hex[:8]}"),
            sampling=common_pb2.SamplingParams(temperature=0.0),
            max_tokens=tokens,
        )
        t0 = last = time.perf_counter()
        call = stub.Generate(timeout=120)
        try:
            await call.write(model_service_pb2.GenerateRequest(start=start))
            await call.done_writing()
            async for msg in call:
                if msg.HasField("delta"):
                    now = time.perf_counter()
                    if sample.ttft_s is None:
                        sample.ttft_s = now - t0
                    else:
                        sample.gaps_s.append(now - last)
                    last = now
                    sample.tokens += len(msg.delta.token_ids)
        except grpc.aio.AioRpcError as err:
            sample.error = str(err.code())
        out.append(sample)
    return out


async def _ws_client(port: int, key: str, n: int, tokens: int) -> list[Sample]:
    import websockets

    out = []
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {key}"},
        max_size=None,
        open_timeout=60,
        compression=None,
    ) as ws:
        await asyncio.wait_for(ws.recv(), 60)  # hello
        for _ in range(n):
            sample = Sample()
            t0 = last = time.perf_counter()
            await ws.send(
                json.dumps(
                    {
                        "type": "submit",
                        "model": "synthetic",
                        "prompt": f"bench {uuid.uuid4().hex[:8]}",
                        "max_tokens": tokens,
                        "temperature": 0,
                    }
                )
            )
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
                kind = frame["type"]
                if kind == "token":
                    now = time.perf_counter()
                    if sample.ttft_s is None:
                        sample.ttft_s = now - t0
                    else:
                        sample.gaps_s.append(now - last)
                    last = now
                elif kind == "done":
                    sample.tokens = frame["usage"]["completion_tokens"]
                    break
                elif kind == "error":
                    sample.error = frame["code"]
                    break
            out.append(sample)
    return out


async def _run_path(
    stack: Stack, key: str, path: str, streams: int, requests: int, tokens: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if path == "direct":
        async with grpc.aio.insecure_channel(stack.model_server) as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            results = await asyncio.gather(
                *(_direct_client(stub, requests, tokens) for _ in range(streams))
            )
    else:
        results = await asyncio.gather(
            *(_ws_client(stack.gateway_port, key, requests, tokens) for _ in range(streams))
        )
    wall = time.perf_counter() - t0
    return summarize([s for batch in results for s in batch], wall)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["tokens_per_s_min"] = ordered[0]["tokens_per_s"]
    chosen["tokens_per_s_max"] = ordered[-1]["tokens_per_s"]
    return chosen


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg(), "scenarios": []}
    with tempfile.TemporaryDirectory(prefix="llmstream-bench-") as tmp:
        async with _bench_stack(Path(tmp)) as (stack, key):
            # Warm-up: connections, consumer assignments, first-request costs.
            await _run_path(stack, key, "pipeline", 4, 2, 8)
            await _run_path(stack, key, "direct", 4, 2, 8)
            for streams in args.pipe_streams:
                runs: dict[str, list[dict[str, Any]]] = {"direct": [], "pipeline": []}
                for _ in range(args.pipe_repeat):
                    for path in ("direct", "pipeline"):
                        runs[path].append(
                            await _run_path(
                                stack, key, path, streams, args.pipe_requests, args.pipe_tokens
                            )
                        )
                direct, pipeline = _median_run(runs["direct"]), _median_run(runs["pipeline"])
                scenario = {
                    "streams": streams,
                    "direct": direct,
                    "pipeline": pipeline,
                    "added_ttft_ms": {
                        q: round(pipeline["ttft_ms"][q] - direct["ttft_ms"][q], 2)
                        for q in ("p50", "p99")
                    },
                    "tokens_per_s_ratio": round(
                        pipeline["tokens_per_s"] / max(direct["tokens_per_s"], 1e-9), 3
                    ),
                }
                results["scenarios"].append(scenario)
                print(
                    f"streams={streams:>4}  direct {direct['tokens_per_s']:>9.0f} tok/s "
                    f"ttft p50 {direct['ttft_ms']['p50']:.1f} ms | pipeline "
                    f"{pipeline['tokens_per_s']:>9.0f} tok/s ttft p50 "
                    f"{pipeline['ttft_ms']['p50']:.1f} p99 {pipeline['ttft_ms']['p99']:.1f} ms | "
                    f"ratio {scenario['tokens_per_s_ratio']:.2f} errors "
                    f"{direct['errors']}/{pipeline['errors']}",
                    file=sys.stderr,
                )
    results["goals"] = goals(results["scenarios"])
    for goal in results["goals"]:
        print(f"{goal['result']:<4} {goal['goal']}: {goal['measured']}", file=sys.stderr)
    results["load_average_at_end"] = os.getloadavg()
    return results


def goals(scenarios: list[dict[str, Any]]) -> list[dict[str, str]]:
    by_streams = {s["streams"]: s for s in scenarios}
    out = []

    def check(goal: str, ok: bool, measured: str) -> None:
        out.append({"goal": goal, "result": "PASS" if ok else "MISS", "measured": measured})

    if 100 in by_streams:
        added = by_streams[100]["added_ttft_ms"]
        check("added TTFT at 100 streams p50 <= 10 ms", added["p50"] <= 10, f"{added['p50']} ms")
        check("added TTFT at 100 streams p99 <= 30 ms", added["p99"] <= 30, f"{added['p99']} ms")
    for s in scenarios:
        check(
            f"tokens/s >= 0.6 x direct at {s['streams']} streams",
            s["tokens_per_s_ratio"] >= 0.6,
            f"{s['tokens_per_s_ratio']} x",
        )
    if 500 in by_streams:
        tps = by_streams[500]["pipeline"]["tokens_per_s"]
        check("pipeline >= 20,000 tokens/s at 500 streams", tps >= 20000, f"{tps} tokens/s")
    return out


def main() -> None:  # `python -m llmstream.pipeline_bench` for a quick run
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
