"""Scenario 1: the whole pipeline vs the model server alone, synthetic engine with zero delay.

    llmstream bench pipeline [--pipe-streams 1 100 500] [--pipe-tokens 64] [--pipe-repeat 3]

A fresh stack of real processes on fresh topics and a fresh database (`llmstream_tools.stack`): one
synthetic model server with zero delay (so the model costs nothing and the pipeline's own
overhead shows), two workers, the aggregator, one gateway. For each concurrency C, closed loop
with C clients, each sending `--pipe-requests` requests one after another:

- direct: C gRPC `Generate` streams straight to the model server;
- pipeline: C WebSockets to the gateway (gateway -> Kafka -> worker -> gRPC -> Kafka -> gateway).

Connections are opened before the clock starts. Each (C, path) runs `--pipe-repeat` times,
alternating direct/pipeline so that load from elsewhere on the machine hits both; the run with
the median tokens/s is reported with min/max. Every run also counts the CPU time (user +
system, /proc) of the path's processes per delivered token: direct = the model server + the
load generator; pipeline = gateway, workers, model server, aggregator + the load generator
(the Kafka broker, PostgreSQL and Redis are not counted on either side).

Goals of issue #21, printed PASS/MISS (never failing the command), at 100 and 500 streams:
pipeline tokens/s >= 0.6 x direct, CPU per delivered token <= 2 x direct; in the open loop
(`--pipe-rates`, unsaturated): added TTFT p50 <= 5 ms, p99 <= 15 ms.

The engine emits one token per message at zero delay, so every token crosses every hop: this
is the pipeline's worst case (per-token CPU in six processes sharing the machine's cores,
against one process for direct), not what a paced model sees (`llmstream bench paced`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg

from llmstream_tools.bench import loadgen
from llmstream_tools.bench.profile import cpu_seconds
from llmstream_tools.bench.targets import DirectTarget, GatewayTarget, Target
from llmstream_tools.stack import Stack, local_stack

PROMPT = loadgen.numbered_prompt("bench")
# Open loop: requests spread over this many sockets / gRPC channels' streams.
OPEN_LOOP_CONNECTIONS = 50
GOAL_STREAMS = (100, 500)  # the goals on tokens/s and CPU are set at these
TOKENS_RATIO_GOAL = 0.6
CPU_RATIO_GOAL = 2.0
OPEN_LOOP_TTFT_GOAL_MS = {"p50": 5.0, "p99": 15.0}


def add_arguments(group: Any) -> None:
    group.add_argument("--pipe-streams", type=int, nargs="+", default=[1, 100, 500])
    group.add_argument("--pipe-tokens", type=int, default=64, help="max_tokens per request")
    group.add_argument(
        "--pipe-requests", type=int, default=2, help="requests per client per run (closed loop)"
    )
    group.add_argument("--pipe-repeat", type=int, default=3, help="runs per (streams, path)")
    group.add_argument(
        "--pipe-rates",
        type=float,
        nargs="*",
        default=[20.0],
        help="open-loop runs too: requests/s (Poisson arrivals), below saturation",
    )
    group.add_argument("--pipe-rate-seconds", type=float, default=5.0, help="open-loop duration")


@asynccontextmanager
async def bench_stack(tmp: Path, **stack_kw: Any) -> AsyncIterator[tuple[Stack, str]]:
    """A `local_stack` (quiet logs) and the API key of a tenant whose tier never throttles."""
    env = {"LLMSTREAM_LOG_LEVEL": "WARNING", **stack_kw.pop("extra_env", {})}
    async with local_stack(tmp, extra_env=env, **stack_kw) as stack:
        async with await psycopg.AsyncConnection.connect(
            stack.database_url, autocommit=True
        ) as conn:
            await conn.execute(
                "INSERT INTO quota_tiers VALUES ('bench', 1000000, 1000000000000,"
                " 1000000000000, 100000, 100000, 100000)"
            )
        _, key = await stack.tenant_key("bench")
        yield stack, key


async def compare(
    targets: Sequence[Target],
    *,
    scenario: str,
    clients: int,
    requests: int,
    max_tokens: int,
    repeat: int,
    prompt: loadgen.PromptFn = PROMPT,
    ramp_s: float = 0.0,
    rate: float | None = None,
    duration_s: float = 5.0,
    processes: dict[str, dict[str, int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The same load against each target, `repeat` times in alternation: closed loop (`clients`
    x `requests`), or with `rate` open loop (Poisson arrivals for `duration_s`, spread over
    `clients` connections). Per target the median run (by tokens/s) with min/max. With
    `processes` (target label -> {process name: pid}) each run of that target also reports the
    CPU of those processes and of this one (the load generator) per delivered token."""
    for t in targets:
        await t.open(clients)
    try:
        for t in targets:  # warm-up: first-request costs, connection windows, consumer fetches
            await loadgen.closed_loop(
                t, clients=min(clients, 8), requests=1, prompt=prompt, max_tokens=8
            )
        runs: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
        for r in range(repeat):
            for t in targets:
                shape = f"{rate:g}/s" if rate else f"x{clients}"
                total = round(rate * duration_s) if rate else clients * requests
                progress = loadgen.Progress(
                    f"{scenario} {t.label} {shape} run {r + 1}/{repeat}", total
                )
                pids = (processes or {}).get(t.label)
                cpu_before = _cpu_now(pids) if pids is not None else None
                if rate:
                    samples, wall = await loadgen.open_loop(
                        t,
                        rate=rate,
                        duration_s=duration_s,
                        clients=clients,
                        prompt=prompt,
                        max_tokens=max_tokens,
                        seed=r,
                        progress=progress,
                    )
                else:
                    samples, wall = await loadgen.closed_loop(
                        t,
                        clients=clients,
                        requests=requests,
                        prompt=prompt,
                        max_tokens=max_tokens,
                        ramp_s=ramp_s,
                        progress=progress,
                    )
                run = loadgen.summarize(samples, wall)
                if pids is not None and cpu_before is not None:
                    run.update(_cpu_per_token(cpu_before, _cpu_now(pids), run))
                runs[t.label].append(run)
    finally:
        for t in targets:
            await t.close()
    return {label: loadgen.median_run(rs) for label, rs in runs.items()}


def _cpu_now(pids: dict[str, int]) -> dict[str, float]:
    seconds = {name: cpu_seconds(pid) for name, pid in pids.items()}
    seconds["load generator"] = time.process_time()
    return seconds


def _cpu_per_token(
    before: dict[str, float], after: dict[str, float], run: dict[str, Any]
) -> dict[str, Any]:
    tokens = max(1, int(run["tokens"]))
    by_process = {n: round((after[n] - before[n]) / tokens * 1e6, 1) for n in before}
    return {
        "cpu_us_per_token": round(sum(by_process.values()), 1),
        "cpu_us_per_token_by_process": by_process,
    }


def path_processes(stack: Stack) -> dict[str, dict[str, int]]:
    """The processes each path runs through (target label -> {name: pid})."""
    return {
        "direct": {"model server": stack.procs["model-server"].pid},
        "pipeline": {name: proc.pid for name, proc in stack.procs.items()},
    }


def added(pipeline: dict[str, Any], direct: dict[str, Any], key: str) -> dict[str, float]:
    """Quantiles of `key` (ttft_ms, itl_ms) of the pipeline minus the direct path's."""
    return {q: round(pipeline[key][q] - direct[key][q], 2) for q in ("p50", "p90", "p99", "max")}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg(), "scenarios": []}
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmstream-bench-") as tmp:
        async with bench_stack(Path(tmp), partitions=12, ttft_ms=0, itl_ms=0) as (stack, key):
            for streams in args.pipe_streams:
                medians = await compare(
                    [DirectTarget(stack.model_server), GatewayTarget(stack.gateway_port, key)],
                    scenario="zero-delay",
                    clients=streams,
                    requests=args.pipe_requests,
                    max_tokens=args.pipe_tokens,
                    repeat=args.pipe_repeat,
                    processes=path_processes(stack),
                )
                direct, pipeline = medians["direct"], medians["pipeline"]
                scenario = {
                    "streams": streams,
                    "direct": direct,
                    "pipeline": pipeline,
                    "added_ttft_ms": added(pipeline, direct, "ttft_ms"),
                    "tokens_per_s_ratio": round(
                        pipeline["tokens_per_s"] / max(direct["tokens_per_s"], 1e-9), 3
                    ),
                    "cpu_us_per_token_ratio": round(
                        pipeline["cpu_us_per_token"] / max(direct["cpu_us_per_token"], 1e-9), 3
                    ),
                }
                results.setdefault("facts", []).append(_cpu_fact(scenario))
                results["scenarios"].append(scenario)
                table += [
                    loadgen.table_row("1 zero-delay", "direct", streams, direct),
                    loadgen.table_row("1 zero-delay", "pipeline", streams, pipeline),
                ]
                print(
                    f"streams={streams:>4}  direct {direct['tokens_per_s']:>9.0f} tok/s "
                    f"ttft p50 {direct['ttft_ms']['p50']:.1f} ms | pipeline "
                    f"{pipeline['tokens_per_s']:>9.0f} tok/s "
                    f"[{pipeline['tokens_per_s_min']:.0f}-{pipeline['tokens_per_s_max']:.0f}] "
                    f"ttft p50 {pipeline['ttft_ms']['p50']:.1f} p99 "
                    f"{pipeline['ttft_ms']['p99']:.1f} ms | ratio "
                    f"{scenario['tokens_per_s_ratio']:.2f} errors "
                    f"{direct['errors']}/{pipeline['errors']}",
                    file=sys.stderr,
                )
            for rate in args.pipe_rates:
                medians = await compare(
                    [DirectTarget(stack.model_server), GatewayTarget(stack.gateway_port, key)],
                    scenario="zero-delay",
                    clients=OPEN_LOOP_CONNECTIONS,
                    requests=0,
                    max_tokens=args.pipe_tokens,
                    repeat=args.pipe_repeat,
                    rate=rate,
                    duration_s=args.pipe_rate_seconds,
                    processes=path_processes(stack),
                )
                direct, pipeline = medians["direct"], medians["pipeline"]
                open_loop = {
                    "rate": rate,
                    "seconds": args.pipe_rate_seconds,
                    "direct": direct,
                    "pipeline": pipeline,
                    "added_ttft_ms": added(pipeline, direct, "ttft_ms"),
                }
                results.setdefault("open_loop", []).append(open_loop)
                table += [
                    loadgen.table_row("1 zero-delay open loop", "direct", f"{rate:g}/s", direct),
                    loadgen.table_row(
                        "1 zero-delay open loop", "pipeline", f"{rate:g}/s", pipeline
                    ),
                ]
                a = open_loop["added_ttft_ms"]
                results.setdefault("facts", []).append(
                    {
                        "what": f"added TTFT (pipeline - direct), open loop {rate:g} requests/s "
                        f"x {args.pipe_tokens} tokens, zero-delay engine",
                        "value": f"p50 {a['p50']:+.1f} ms, p90 {a['p90']:+.1f}, p99 {a['p99']:+.1f}",
                    }
                )
                print(f"open loop {rate:g}/s: added TTFT {a}", file=sys.stderr)
    results["table"] = table
    results["goals"] = goals(results["scenarios"], results.get("open_loop", []))
    for goal in results["goals"]:
        print(f"{goal['result']:<4} {goal['goal']}: {goal['measured']}", file=sys.stderr)
    results["load_average_at_end"] = os.getloadavg()
    return results


def _cpu_fact(s: dict[str, Any]) -> dict[str, str]:
    def parts(run: dict[str, Any]) -> str:
        by = sorted(run["cpu_us_per_token_by_process"].items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {us:,.0f}" for name, us in by)

    return {
        "what": f"CPU µs per delivered token, {s['streams']} zero-delay streams (by process)",
        "value": f"pipeline {s['pipeline']['cpu_us_per_token']:,.0f} ({parts(s['pipeline'])}) · "
        f"direct {s['direct']['cpu_us_per_token']:,.0f} ({parts(s['direct'])}) · ratio "
        f"{s['cpu_us_per_token_ratio']} x",
    }


def goals(
    scenarios: list[dict[str, Any]], open_loops: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """Issue #21's goals that this suite measures."""
    check = loadgen.check
    out = []
    for s in scenarios:
        if s["streams"] not in GOAL_STREAMS:
            continue
        ratio, cpu = s["tokens_per_s_ratio"], s["cpu_us_per_token_ratio"]
        out.append(
            check(
                f"zero-delay, {s['streams']} streams: pipeline tokens/s >= "
                f"{TOKENS_RATIO_GOAL} x direct",
                ratio >= TOKENS_RATIO_GOAL,
                f"{ratio} x ({s['pipeline']['tokens_per_s']:,.0f} vs "
                f"{s['direct']['tokens_per_s']:,.0f} tokens/s)",
            )
        )
        out.append(
            check(
                f"zero-delay, {s['streams']} streams: CPU per delivered token <= "
                f"{CPU_RATIO_GOAL:g} x direct",
                cpu <= CPU_RATIO_GOAL,
                f"{cpu} x ({s['pipeline']['cpu_us_per_token']:,.0f} vs "
                f"{s['direct']['cpu_us_per_token']:,.0f} µs)",
            )
        )
    for o in open_loops:
        for q, limit in OPEN_LOOP_TTFT_GOAL_MS.items():
            extra = o["added_ttft_ms"][q]
            out.append(
                check(
                    f"open loop {o['rate']:g} requests/s: added TTFT {q} <= {limit:g} ms",
                    extra <= limit,  # nan (a failed path) compares False
                    f"{extra:+.1f} ms",
                )
            )
    return out


def main() -> None:  # `python -m llmstream_tools.bench.pipeline` for a quick run
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    print(json.dumps(loadgen.run_event_loop(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
