"""`llmstream chaos --soak 30m`: steady paced traffic for a long time, a fault every few
minutes, and whether any process grows without bound.

On one private deployment (as `llmstream chaos`), phases alternate: steady traffic (`steady`:
`requests` requests submitted evenly over `soak_gap_s`), then the next fault of the rotation
(the run's `--faults`, by default `options.soak_faults`),
then steady traffic again, at least once and until `soak_s` has passed; the soak ends with
steady traffic. Every
phase gets the strict verdict of `chaos.check`. Meanwhile `chaos.resources` samples RSS and
open fds of every process every `sample_every_s` and after every phase (quiet samples), and
judges their growth from the first fault on.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmstream_tools import infra
from llmstream_tools.chaos import check, resources
from llmstream_tools.chaos.faults import DuplicateBills
from llmstream_tools.chaos.options import STEADY, Options
from llmstream_tools.chaos.runner import check_faults, deployment, expected_texts, run_phase
from llmstream_tools.stack import Stack


def _processes(stack: Stack) -> dict[str, tuple[str, int]]:
    """name -> (kind, pid) of every process alive now: the stack's and the infrastructure's."""
    out = {
        name: (resources.SERVICE, proc.pid)
        for name, proc in stack.procs.items()
        if proc.poll() is None
    }
    for node in infra.kafka_nodes():
        if node.pid is not None:
            out[f"kafka-{node.node_id}"] = (resources.INFRA, node.pid)
    for server in infra.status():
        if server.name in ("redis", "postgres") and server.pid is not None:
            out[server.name] = (resources.INFRA, server.pid)
    return out


class Sampler:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.started = time.monotonic()
        self.samples: list[resources.Sample] = []

    def now_s(self) -> float:
        return round(time.monotonic() - self.started, 1)

    async def take(self, label: str, quiet: bool) -> float:
        at = self.now_s()
        processes = await asyncio.to_thread(_processes, self.stack)
        self.samples += await asyncio.to_thread(resources.take, processes, at, label, quiet)
        return at

    async def every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.take("minute", quiet=False)


async def soak(opts: Options, workdir: Path) -> tuple[list[check.FaultResult], dict[str, Any]]:
    """The phases' results and the soak's record (samples, growth, verdict)."""
    check_faults(opts)
    expected = await expected_texts(opts)
    results: list[check.FaultResult] = []
    async with deployment(opts, workdir) as stack:
        bills = DuplicateBills(stack)
        sampler = Sampler(stack)
        await sampler.take("start", quiet=True)
        ticker = asyncio.create_task(sampler.every(opts.sample_every_s))
        rotation = itertools.cycle(opts.faults)
        try:

            async def phase(fault: str) -> float:
                results.append(await run_phase(stack, fault, opts, expected, bills))
                return await sampler.take(f"after {fault}", quiet=True)

            await phase(STEADY)
            # Warm from the quiet sample after the first fault (there is always one).
            warm_from = await phase(next(rotation))
            await phase(STEADY)
            while sampler.now_s() < opts.soak_s:
                print(f"   soak: {sampler.now_s():.0f} of {opts.soak_s:.0f} s", file=sys.stderr)
                await phase(next(rotation))
                await phase(STEADY)
        finally:
            ticker.cancel()
        seconds = sampler.now_s()
    growth = resources.judge_growth(sampler.samples, warm_from)
    grew = [g for g in growth if g.findings]
    record = {
        "seconds": seconds,
        "rotation": opts.faults,
        "faults_injected": sum(r.fault != STEADY for r in results),
        "limits": asdict(resources.GrowthLimits()),
        "warm_from_s": warm_from,
        "growth_table": resources.growth_table(growth),
        "growth": [
            {"name": g.name, "kind": g.kind, "pids": g.pids, "verdict": g.verdict} for g in growth
        ],
        "samples": [asdict(s) for s in sampler.samples],
        "ok": not grew,
    }
    return results, record
