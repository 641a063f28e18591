"""SSE vs WebSocket: the OpenAI-compatible API against llmstream's own protocol, same pipeline.

    llmstream bench sse [--sse-streams 1 100] [--sse-tokens 64] [--sse-repeat 3]

A fresh stack of real processes (`llmstream_tools.stack`, as `llmstream bench pipeline`: one
synthetic model server with zero delay, two workers, the aggregator, one gateway). For each
concurrency C, closed loop with C clients, each sending `--sse-requests` requests one after
another, in alternation (`--sse-repeat` runs each, the median by tokens/s reported):

- websocket: C WebSockets, protocol llmstream.v1 (docs/protocol.md);
- sse: C HTTP/1.1 keep-alive connections, streamed `POST /v1/completions` with
  `stream_options.include_usage` (docs/openai.md): the same gateway, admission and token feed,
  rendered as OpenAI chunks and framed as Server-Sent Events.

TTFT is submit -> first token on the client; tokens/s the completion tokens of all requests
over the run's wall time. Both front ends share everything behind the rendering, so the
difference is the cost of HTTP requests, chunk rendering and SSE framing. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmstream_tools.bench import loadgen
from llmstream_tools.bench.openai_target import OpenAITarget
from llmstream_tools.bench.pipeline import bench_stack, compare
from llmstream_tools.bench.targets import GatewayTarget

MODEL = "synthetic"


def add_arguments(group: Any) -> None:
    group.add_argument("--sse-streams", type=int, nargs="+", default=[1, 100])
    group.add_argument("--sse-tokens", type=int, default=64, help="max_tokens per request")
    group.add_argument("--sse-requests", type=int, default=2, help="requests per client per run")
    group.add_argument("--sse-repeat", type=int, default=3, help="runs per (streams, path)")


def _fact(path: str, streams: int, run: dict[str, Any]) -> dict[str, str]:
    ttft = run["ttft_ms"]
    return {
        "what": f"{path} at {streams} stream(s), {run['requests']} requests, zero-delay engine",
        "value": f"TTFT p50 {ttft['p50']:.1f} ms p99 {ttft['p99']:.1f} ms, "
        f"{run['tokens_per_s']:,.0f} tokens/s, errors {run['errors']}",
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"scenarios": [], "table": [], "facts": []}
    with tempfile.TemporaryDirectory(prefix="llmstream-bench-") as tmp:
        async with bench_stack(Path(tmp), partitions=12, ttft_ms=0, itl_ms=0) as (stack, key):
            port = stack.gateway_port
            for streams in args.sse_streams:
                targets = [
                    GatewayTarget(port, key, MODEL, label="websocket"),
                    OpenAITarget(
                        "127.0.0.1", port, MODEL, label="sse", api_key=key, include_usage=True
                    ),
                ]
                medians = await compare(
                    targets,
                    scenario="sse-vs-ws",
                    clients=streams,
                    requests=args.sse_requests,
                    max_tokens=args.sse_tokens,
                    repeat=args.sse_repeat,
                )
                results["scenarios"].append({"streams": streams, **medians})
                for path, medians_run in medians.items():
                    results["table"].append(
                        loadgen.table_row("SSE vs WebSocket", path, streams, medians_run)
                    )
                    results["facts"].append(_fact(path, streams, medians_run))
                ws, sse = medians["websocket"], medians["sse"]
                print(
                    f"streams={streams:>4}  websocket {ws['tokens_per_s']:>8.0f} tok/s ttft p50 "
                    f"{ws['ttft_ms']['p50']:.1f} ms | sse {sse['tokens_per_s']:>8.0f} tok/s "
                    f"ttft p50 {sse['ttft_ms']['p50']:.1f} ms | errors "
                    f"{ws['errors']}/{sse['errors']}",
                    file=sys.stderr,
                )
    return results
