"""Noisy neighbour: one tenant's burst against another tenant's steady trickle, with and without
the worker's fair share (docs/scheduling.md), side by side in one run.

    llmstream bench noisy-neighbour [--nn-burst 1000] [--nn-slots 64] [--nn-tokens 50]
                                    [--nn-ttft-ms 50] [--nn-itl-ms 20] [--nn-alone 10]

A synthetic model server paced like a model (`--nn-ttft-ms`, then a token every
`--nn-itl-ms`) behind one worker with `--nn-slots` slots (LLMSTREAM_WORKER_MAX_INFLIGHT; the
model server has more, so the worker's order is what decides). Three cases, each a fresh worker
over fresh topics:

- **alone**: tenant B submits `--nn-alone` requests, one a second;
- **fair**: tenant A submits `--nn-burst` requests at once while B submits one a second until
  A's last request ends (default settings: the read-ahead window, fair share);
- **fifo**: the same with LLMSTREAM_WORKER_READ_AHEAD=0 (log order).

Reported: B's TTFT p50/p99 in each case and A's total time (its submit to its last request's
end). Goals (issue 19): B's p99 TTFT under A's burst with fair share <= 2 x B's p99 alone; A's
total with fair share within 10 % of FIFO's (no lost throughput). Needs the Kafka broker of
`llmstream infra up`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from llmstream_tools.bench.loadgen import check, quantile
from llmstream_tools.bench.scheduling import Case, case, model_server, ms


def add_arguments(group: Any) -> None:
    group.add_argument("--nn-burst", type=int, default=1000, help="tenant A's burst (requests)")
    group.add_argument("--nn-slots", type=int, default=64, help="the worker's MAX_INFLIGHT")
    group.add_argument("--nn-tokens", type=int, default=50, help="max_tokens of every request")
    group.add_argument("--nn-ttft-ms", type=float, default=50.0)
    group.add_argument("--nn-itl-ms", type=float, default=20.0)
    group.add_argument("--nn-alone", type=int, default=10, help="B's requests in the alone case")


async def trickle(
    c: Case, tokens: int, until: asyncio.Future[None] | None, count: int
) -> list[str]:
    """Tenant B: one request a second, `count` of them, or until `until` is done (at least 3)."""
    ids: list[str] = []
    start = time.monotonic()
    while True:
        ids += await c.submit("tenant-b", 1, tokens)
        if until is None and len(ids) >= count:
            return ids
        if until is not None and until.done() and len(ids) >= 3:
            return ids
        await asyncio.sleep(max(0.0, start + len(ids) - time.monotonic()))


async def burst_case(c: Case, args: argparse.Namespace) -> dict[str, Any]:
    a_started = time.monotonic()
    a_ids = await c.submit("tenant-a", args.nn_burst, args.nn_tokens)
    hang_guard = 60 + args.nn_burst * args.nn_tokens * args.nn_itl_ms / 1000
    a_done = asyncio.ensure_future(c.tracker.wait(a_ids, ended=True, within_s=hang_guard))
    b_ids = await trickle(c, args.nn_tokens, a_done, 0)
    await a_done
    await c.tracker.wait(b_ids, ended=True, within_s=120)
    a_end = max(c.tracker.times[r].ended or 0.0 for r in a_ids)
    result = b_result(c, b_ids)
    result["a_total_s"] = round(a_end - a_started, 2)
    result["a_not_length"] = sum(1 for r in a_ids if c.tracker.times[r].finish != "length")
    return result


def b_result(c: Case, b_ids: list[str]) -> dict[str, Any]:
    ttfts = sorted(c.tracker.times[r].ttft_s for r in b_ids)
    return {
        "b_requests": len(b_ids),
        "b_ttft_p50_ms": ms(quantile(ttfts, 0.5)),
        "b_ttft_p99_ms": ms(quantile(ttfts, 0.99)),
        "b_ttft_max_ms": ms(ttfts[-1]),
        "b_not_length": sum(1 for r in b_ids if c.tracker.times[r].finish != "length"),
        # In submit order: the first ones meet the burst, the last ones may come after it.
        "b_ttft_ms": [ms(c.tracker.times[r].ttft_s) for r in b_ids],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "burst": args.nn_burst,
        "slots": args.nn_slots,
        "tokens_per_request": args.nn_tokens,
        "configured_ttft_ms": args.nn_ttft_ms,
        "configured_itl_ms": args.nn_itl_ms,
        "cases": {},
    }
    slots = {"LLMSTREAM_WORKER_MAX_INFLIGHT": str(args.nn_slots)}
    async with model_server(args.nn_ttft_ms, args.nn_itl_ms) as addr:
        async with case([addr], **slots) as c:
            b_ids = await trickle(c, args.nn_tokens, None, args.nn_alone)
            await c.tracker.wait(b_ids, ended=True, within_s=120)
            result["cases"]["alone"] = b_result(c, b_ids)
        print(f"alone: {result['cases']['alone']}", file=sys.stderr, flush=True)
        async with case([addr], **slots) as c:
            result["cases"]["fair"] = await burst_case(c, args)
        print(f"fair: {result['cases']['fair']}", file=sys.stderr, flush=True)
        async with case([addr], LLMSTREAM_WORKER_READ_AHEAD="0", **slots) as c:
            result["cases"]["fifo"] = await burst_case(c, args)
        print(f"fifo: {result['cases']['fifo']}", file=sys.stderr, flush=True)
    alone, fair, fifo = (result["cases"][k] for k in ("alone", "fair", "fifo"))
    result["facts"] = [
        {
            "what": f"tenant B's TTFT p50 / p99, 1 request/s ({case_name})",
            "value": f"{r['b_ttft_p50_ms']} / {r['b_ttft_p99_ms']} ms ({r['b_requests']} requests)",
        }
        for case_name, r in (
            ("alone", alone),
            (f"during A's burst of {args.nn_burst}, fair share", fair),
            (f"during A's burst of {args.nn_burst}, log order", fifo),
        )
    ] + [
        {
            "what": f"tenant A's {args.nn_burst} requests, submit to last end ({name})",
            "value": f"{r['a_total_s']} s",
        }
        for name, r in (("fair share", fair), ("log order", fifo))
    ]
    result["goals"] = [
        check(
            "noisy neighbour: B's p99 TTFT under A's burst (fair share) <= 2 x B's p99 alone",
            fair["b_ttft_p99_ms"] <= 2 * alone["b_ttft_p99_ms"],
            f"{fair['b_ttft_p99_ms']} ms vs alone {alone['b_ttft_p99_ms']} ms "
            f"(log order: {fifo['b_ttft_p99_ms']} ms)",
        ),
        check(
            "noisy neighbour: A's total time with fair share within 10 % of log order's",
            fair["a_total_s"] <= 1.10 * fifo["a_total_s"],
            f"{fair['a_total_s']} s vs {fifo['a_total_s']} s "
            f"({(fair['a_total_s'] / fifo['a_total_s'] - 1) * 100:+.1f} %)",
        ),
        check(
            "noisy neighbour: every request ends by its max_tokens",
            all(r["b_not_length"] == 0 for r in (alone, fair, fifo))
            and fair["a_not_length"] == 0
            and fifo["a_not_length"] == 0,
            ", ".join(
                f"{name}: {r['b_not_length'] + r.get('a_not_length', 0)} other"
                for name, r in (("alone", alone), ("fair", fair), ("fifo", fifo))
            ),
        ),
    ]
    return result
