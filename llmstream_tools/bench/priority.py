"""Priority classes: an interactive request behind a queue of batch requests, with the worker's
priority order (docs/scheduling.md) and in log order, side by side in one run.

    llmstream bench priority [--prio-batch 500] [--prio-slots 8] [--prio-tokens 20]
                             [--prio-ttft-ms 50] [--prio-itl-ms 20]

One tenant submits `--prio-batch` requests of priority -1 (batch) to a worker with
`--prio-slots` slots in front of a paced synthetic model server; once every slot streams, it
submits one request of priority 1 (interactive). Two cases, each a fresh worker over fresh
topics: **priority** (default settings) and **log order** (LLMSTREAM_WORKER_READ_AHEAD=0). One
tenant only, so fair share between tenants plays no part.

Reported: the interactive request's TTFT, the length of one generation slot (the batch
requests' median first token to end, plus the configured TTFT), every batch request's end.
Goals (issue 19): the interactive request starts within one generation slot; every batch
request still finishes. Needs the Kafka broker of `llmstream infra up`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from llmstream_tools.bench.loadgen import check
from llmstream_tools.bench.scheduling import Case, case, model_server, ms


def add_arguments(group: Any) -> None:
    group.add_argument("--prio-batch", type=int, default=500, help="batch requests queued")
    group.add_argument("--prio-slots", type=int, default=8, help="the worker's MAX_INFLIGHT")
    group.add_argument("--prio-tokens", type=int, default=20, help="max_tokens of every request")
    group.add_argument("--prio-ttft-ms", type=float, default=50.0)
    group.add_argument("--prio-itl-ms", type=float, default=20.0)


async def queue_case(c: Case, args: argparse.Namespace) -> dict[str, Any]:
    batch = await c.submit("tenant-a", args.prio_batch, args.prio_tokens, priority=-1)
    # Every slot streams a batch request before the interactive one comes.
    await c.tracker.wait(batch[: args.prio_slots], ended=False, within_s=60)
    (chat,) = await c.submit("tenant-a", 1, args.prio_tokens, priority=1)
    hang_guard = 60 + args.prio_batch * args.prio_tokens * args.prio_itl_ms / 1000
    await c.tracker.wait([chat, *batch], ended=True, within_s=hang_guard)
    times = c.tracker.times
    slot_s = statistics.median(
        (times[r].ended or 0.0) - (times[r].first_token or 0.0) for r in batch
    ) + (args.prio_ttft_ms / 1000)
    return {
        "interactive_ttft_ms": ms(times[chat].ttft_s),
        "generation_slot_ms": ms(slot_s),
        "batch_finished": sum(1 for r in batch if times[r].finish == "length"),
        "batch_last_end_s": round(
            max(times[r].ended or 0.0 for r in batch) - times[batch[0]].submitted, 2
        ),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "batch": args.prio_batch,
        "slots": args.prio_slots,
        "tokens_per_request": args.prio_tokens,
        "configured_ttft_ms": args.prio_ttft_ms,
        "configured_itl_ms": args.prio_itl_ms,
        "cases": {},
    }
    slots = {"LLMSTREAM_WORKER_MAX_INFLIGHT": str(args.prio_slots)}
    async with model_server(args.prio_ttft_ms, args.prio_itl_ms) as addr:
        async with case([addr], **slots) as c:
            result["cases"]["priority"] = await queue_case(c, args)
        print(f"priority: {result['cases']['priority']}", file=sys.stderr, flush=True)
        async with case([addr], LLMSTREAM_WORKER_READ_AHEAD="0", **slots) as c:
            result["cases"]["log_order"] = await queue_case(c, args)
        print(f"log order: {result['cases']['log_order']}", file=sys.stderr, flush=True)
    prio, fifo = result["cases"]["priority"], result["cases"]["log_order"]
    n = args.prio_batch
    result["facts"] = [
        {
            "what": f"interactive request's TTFT behind {n} queued batch requests ({name})",
            "value": f"{r['interactive_ttft_ms']} ms (one generation slot: "
            f"{r['generation_slot_ms']} ms)",
        }
        for name, r in (("priority classes", prio), ("log order", fifo))
    ]
    result["goals"] = [
        check(
            f"priority: an interactive request behind {n} batch requests starts within one "
            "generation slot",
            prio["interactive_ttft_ms"] <= prio["generation_slot_ms"],
            f"TTFT {prio['interactive_ttft_ms']} ms, slot {prio['generation_slot_ms']} ms "
            f"(log order: {fifo['interactive_ttft_ms']} ms)",
        ),
        check(
            f"priority: all {n} batch requests still finish",
            prio["batch_finished"] == n,
            f"{prio['batch_finished']} of {n} ended by max_tokens, the last "
            f"{prio['batch_last_end_s']} s after the first submit",
        ),
    ]
    return result
