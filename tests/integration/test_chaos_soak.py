"""The soak mode's loop (llmstream_tools/chaos/soak.py) in its smallest form: steady traffic,
one fault (a worker killed), steady traffic again, on a private infrastructure and a whole local
stack; every phase judged strictly, RSS and fds of every process sampled at the start and
after every phase, and the growth verdict written into the record. (The verdict's rules are
unit-tested in tests/unit/test_chaos_soak.py; a soak long enough to say something about
growth is `llmstream chaos --soak 30m`, not part of `make test`.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstream_tools.chaos.options import STEADY, Options
from llmstream_tools.chaos.resources import INFRA, SERVICE
from llmstream_tools.chaos.soak import soak

pytestmark = pytest.mark.integration


async def test_a_soak_alternates_steady_traffic_and_faults_and_samples_every_process(
    tmp_path: Path,
) -> None:
    opts = Options.quick_version(
        faults=["worker"], requests=12, soak_s=1.0, soak_gap_s=6.0, max_probes=4
    )
    results, record = await soak(opts, tmp_path)

    assert [r.fault for r in results] == [STEADY, "worker", STEADY]
    for r in results:
        where = (r.fault, r.examples, r.notes, r.proof)
        assert r.kept == r.requests == opts.requests and r.ok, where
    assert record["faults_injected"] == 1 and record["rotation"] == ["worker"]
    # Quiet samples: at the start and after each of the three phases, for every service.
    samples = record["samples"]
    labels = [s["label"] for s in samples if s["quiet"] and s["name"] == "gateway"]
    assert labels == ["start", f"after {STEADY}", "after worker", f"after {STEADY}"]
    assert all(s["rss_kib"] > 0 and s["fds"] > 0 for s in samples)
    growth = {g["name"]: g for g in record["growth"]}
    assert {"gateway", "gateway-1", "worker-0", "worker-1", "aggregator"} <= set(growth)
    assert growth["kafka-1"]["kind"] == INFRA and growth["kafka-1"]["verdict"] == "reported"
    # The killed worker came back with a new pid, judged on its own from the fault on (the
    # first incarnation has no quiet sample after it: not judged, which does not fail).
    assert len(growth["worker-0"]["pids"]) == 2 and growth["worker-0"]["verdict"] == "ok"
    assert growth["worker-1"]["kind"] == SERVICE and growth["worker-1"]["verdict"] == "ok"
    assert record["warm_from_s"] is not None and record["ok"], record["growth_table"]
