"""Fault injection, quick version of `make chaos` (llmstream_tools/chaos/): on a private Kafka /
PostgreSQL / Redis instance and a whole local stack (two gateways, two workers, two synthetic
model servers, the aggregator), each fault is injected while every request of its phase
streams: kill -9 of a worker, a model server replica, a gateway replica (its clients reconnect
to the other and resume), the aggregator; Redis and PostgreSQL restarts; a client that stops
reading; the broker killed with kill -9; a gateway killed while Redis restarts and the
aggregator killed while PostgreSQL restarts. New requests are submitted while each fault goes
on. (`make chaos` adds the broker's clean stop, the zombie worker — here in
test_zombie_worker.py —, the link faults — here in test_chaos_network.py — and the 3-broker
faults.)

The strict verdict (llmstream_tools/chaos/check.py) for each: every request kept (one `done`,
`stop`/`length`, the synthetic engine's uninterrupted text, no seq gap or repeat, the log
agreeing), no error frame without a retry hint, billed once (ledger, usage_daily, Redis counters and the
aggregator's duplicate-bill counter agree), every new submit served whole or refused with a
retry hint, the fault proven to have happened, no other process needing a restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstream_tools import infra
from llmstream_tools.chaos.options import Options, default_faults
from llmstream_tools.chaos.runner import run

pytestmark = pytest.mark.integration


async def test_every_fault_keeps_every_request_whole_and_billed_once(tmp_path: Path) -> None:
    shared_before = [(c.name, c.pid) for c in infra.status()]
    opts = Options.quick_version()
    results = await run(opts, tmp_path)

    assert [r.fault for r in results] == opts.faults == default_faults(1, quick=True)
    for r in results:
        where = (r.fault, r.examples, r.notes)
        # Every request was streaming just before the fault; on a busy machine the first ones
        # may finish before the last ones start, so not all need still be in flight.
        assert r.in_flight >= opts.requests // 2, where
        assert r.kept == r.requests, (r.outcomes, where)
        assert (r.unhinted_errors, r.repeated_seq, r.gapped_seq) == (0, 0, 0), where
        assert (r.double_bills, r.billing_mismatches) == (0, 0), where
        assert r.probes["bad"] == 0 and sum(r.probes.values()) > 0, (r.probes, where)
        assert r.proven, (r.proof, where)
        assert r.dead_processes == [], where
        assert r.ok, where
    by_fault = {r.fault: r for r in results}
    # The faults hit running requests: streams were taken over, clients reconnected.
    assert by_fault["worker"].extra["takeovers"] > 0
    assert by_fault["model-server"].extra["takeovers"] > 0
    assert by_fault["gateway"].extra["reconnects"] > 0
    assert by_fault["kafka-kill"].outage_s >= opts.kafka_down_s
    # The shared infrastructure (other tests use it meanwhile) was not touched.
    assert [(c.name, c.pid) for c in infra.status()] == shared_before
