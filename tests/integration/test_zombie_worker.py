"""A zombie worker (llmstream_tools/chaos/, fault `zombie`): a worker is frozen with SIGSTOP past
its group session timeout while 30 sampled requests stream (unseeded temperature 1: an
attempt's continuation is its own, so a zombie's tokens differ from the new owner's), the other
worker takes its requests over, then it is resumed with SIGCONT and holds buffered model output
and unsent events of requests it no longer owns.

Without fencing (measured before it existed): 14 of 30 clients assembled a text mixing the
zombie's continuation with the new owner's: on resume, before its heartbeat learned that it was
out, the zombie wrote 42 events from buffered model output, and the fold took them. With fencing (docs/events.md, "Fencing"): each
client's text is exactly what the request's owner produced (`check.owner_truth`, computed from
the log and the workers' logged assignments, without the fold), bills are the owner's, and the
zombie writes nothing while it is out of the group.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstream_tools.chaos.options import Options
from llmstream_tools.chaos.runner import run

pytestmark = pytest.mark.integration


async def test_a_resumed_zombie_reaches_no_client_and_no_bill(tmp_path: Path) -> None:
    opts = Options.quick_version(faults=["zombie"])
    (r,) = await run(opts, tmp_path)
    where = (r.examples, r.notes, r.extra)
    assert r.proven, (r.proof, where)  # it was stopped (state T), then resumed
    assert r.extra["taken_over"] > 0, where  # the other worker started its requests
    assert r.kept == r.requests, (r.outcomes, where)
    assert (r.unhinted_errors, r.repeated_seq, r.gapped_seq) == (0, 0, 0), where
    assert (r.double_bills, r.billing_mismatches) == (0, 0), where
    # The zombie noticed its standstill before producing anything: no event it created while
    # out of the group reached the log (what it had sent before the freeze landed late and the
    # fold ignored it: `fenced_events`).
    assert r.extra["zombie_late_events"] == 0, where
    assert r.ok, where
