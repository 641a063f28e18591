"""`/readyz` probes at most once per interval however many callers; concurrent callers share
the probe in flight."""

from __future__ import annotations

import asyncio

from gateway.readiness import ProbeCache


async def test_probes_run_once_per_interval_and_concurrent_callers_share_one() -> None:
    now = [0.0]
    release = asyncio.Event()

    async def probe() -> dict[str, str]:
        await release.wait()
        return {"redis": "ok"}

    cache = ProbeCache(probe, interval_s=1.0, clock=lambda: now[0])
    callers = [asyncio.create_task(cache.checks()) for _ in range(300)]
    await asyncio.sleep(0)
    release.set()
    assert all(c == {"redis": "ok"} for c in await asyncio.gather(*callers))
    assert cache.probes == 1
    now[0] = 0.9
    await cache.checks()
    assert cache.probes == 1
    now[0] = 1.0
    await cache.checks()
    assert cache.probes == 2
