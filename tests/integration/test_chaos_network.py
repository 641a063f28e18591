"""The link faults of `llmstream chaos` (llmstream_tools/chaos/netns.py, forward.py), on a
private infrastructure and a whole local stack like test_chaos.py: a worker runs in its own
network namespace and its veth goes down for longer than its group session (its requests are
taken over by the other worker, its late events fenced when the link returns); a gateway
replica runs in its own namespace with 200 ms more on every round trip to the brokers. Both
get the strict verdict, and afterwards no namespace or veth of this run is left.

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


async def test_a_cut_worker_link_and_a_slow_gateway_link_keep_every_request(
    tmp_path: Path,
) -> None:
    opts = Options.quick_version(
        faults=["worker-link", "gateway-delay"], link_down_s=12.0, link_delay_s=8.0
    )
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
    cut, slow = results
    # The cut: the link was DOWN, a broker round trip over it failed meanwhile, and the group
    # moved the cut worker's requests to the other worker.
    assert cut.extra["link"]["state_while_cut"] == "DOWN"
    probes = [(p["at"], "ok" in p) for p in cut.extra["link"]["probes"]]
    # (Right after `up` a probe may still meet "no route to host" until the carrier is back.)
    assert probes[:2] == [("before", True), ("down", False)] and probes[-1] == ("up", True)
    assert cut.extra["takeovers"] > 0 and cut.outage_s >= opts.link_down_s
    # The delay: round trips to the brokers through the link took (at least 90% of) 200 ms
    # longer; each was answered.
    link = slow.extra["link"]
    assert link["added_ms"] >= 0.9 * opts.link_delay_ms, link
    assert all("ok" in p for p in link["probes"]), link
    # Every namespace and veth of this run is gone.
    mine = f"{NAME_PREFIX}{os.getpid()}-"
    assert not [line for line in _ip("netns", "list").splitlines() if line.startswith(mine)]
    assert f"lc{os.getpid()}-" not in _ip("-o", "link", "show")
