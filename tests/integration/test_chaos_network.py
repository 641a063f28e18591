"""The link faults of `llmstream chaos` (llmstream_tools/chaos/netns.py, forward.py), on a
private infrastructure and a whole local stack like test_chaos.py: a service runs in its own
network namespace with 200 ms more on every round trip to the brokers (a gateway replica).
It gets the strict verdict, and afterwards no namespace or veth of this run is left. (The
worker-link fault is left out for now: see below.)

Namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN): where the machine refuses them, the
fault's result says why and the test is skipped with that message (the only skip the chaos
suite has).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from llmstream_tools.chaos.netns import NAME_PREFIX
from llmstream_tools.chaos.options import Options
from llmstream_tools.chaos.runner import run

pytestmark = pytest.mark.integration


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


# `worker-link` is left out of the quick run for now: since the fast takeover and the read-ahead
# window landed (2026-12-08), requests of the cut worker's partitions can stay unfinished after
# its link returns and it rejoins (16 of 38 in the last run: taken over, then revoked again, and
# nobody restarts them). That is a loss bug, open in issue 18 and docs/chaos.md; `llmstream
# chaos --faults worker-link` shows it.
async def test_a_slow_gateway_link_keeps_every_request(
    tmp_path: Path,
) -> None:
    opts = Options.quick_version(faults=["gateway-delay"], link_delay_s=8.0)
    results = await run(opts, tmp_path)

    skipped = [r.skipped for r in results if r.skipped]
    if skipped:
        pytest.skip(f"the machine refuses network namespaces: {skipped[0]}")
    for r in results:
        where = (r.fault, r.examples, r.notes, r.proof)
        assert r.in_flight >= opts.requests // 2, where
        assert r.kept == r.requests, (r.outcomes, where)
        assert (r.unhinted_errors, r.repeated_seq, r.gapped_seq) == (0, 0, 0), where
        assert (r.double_bills, r.billing_mismatches) == (0, 0), where
        assert r.probes["bad"] == 0 and sum(r.probes.values()) > 0, (r.probes, where)
        assert r.proven and r.dead_processes == [] and r.ok, where
    (slow,) = results
    # The delay: round trips to the brokers through the link took (at least 90% of) 200 ms
    # longer; each was answered.
    link = slow.extra["link"]
    assert link["added_ms"] >= 0.9 * opts.link_delay_ms, link
    assert all("ok" in p for p in link["probes"]), link
    # Every namespace and veth of this run is gone.
    mine = f"{NAME_PREFIX}{os.getpid()}-"
    assert not [line for line in _ip("netns", "list").splitlines() if line.startswith(mine)]
    assert f"lc{os.getpid()}-" not in _ip("-o", "link", "show")
