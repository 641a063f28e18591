"""The faults `llmstream chaos` knows, their goals, and the options of a run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FAULTS: dict[str, str] = {
    "worker": "kill -9 a worker",
    "model-server": "kill -9 a model server replica",
    "gateway": "kill -9 the gateway replica half of the clients are connected to",
    "aggregator": "kill -9 the aggregator",
    "redis": "restart Redis",
    "postgres": "restart PostgreSQL",
    "stall": "one client stops reading for --stall-s",
    "kafka": "stop every broker (controlled shutdown), start them again after --kafka-down-s",
    "kafka-kill": "kill -9 every broker, start them again after --kafka-down-s",
    "kafka-leader": "kill -9 the leader of a tokens partition, later one of its followers, "
    "start both again after --kafka-down-s (3 brokers)",
    "worker+leader": "kill -9 a worker while the tokens leader is killed (3 brokers)",
    "gateway+redis": "kill -9 a gateway replica while Redis restarts",
    "aggregator+postgres": "kill -9 the aggregator while PostgreSQL restarts",
    "zombie": "SIGSTOP a worker past its session timeout, SIGCONT once its requests were "
    "taken over (sampled requests: a zombie's continuation differs from the new owner's)",
    "worker-link": "cut the network link of a worker in its own namespace (everything it dials: "
    "brokers, model servers) for --link-down-s",
    "gateway-delay": "every round trip between a gateway replica in its own namespace and the "
    "brokers --link-delay-ms longer for --link-delay-s",
}
# Not a fault: a soak's steady traffic between two faults (requests submitted evenly over
# `soak_gap_s`, judged like every phase's).
STEADY = "steady"
STEADY_TEXT = "steady paced traffic, no fault"
# Faults that need a cluster: with one broker there is no leader to move.
CLUSTER_FAULTS = ("kafka-leader", "worker+leader")
# Process of the stack each kill fault hits (the first replica).
KILLS = {
    "worker": "worker-0",
    "model-server": "model-server",
    "gateway": "gateway",
    "aggregator": "aggregator",
}
# Faults whose process runs in its own network namespace for the phase (chaos.netns).
NET_FAULTS = {"worker-link": "worker-0", "gateway-delay": "gateway"}
# The recovery goal each fault is measured against (recovery.GOALS).
GOALS = {
    "worker": "worker kill -9",
    "gateway": "gateway kill -9",
    "kafka": "broker back",
    "kafka-kill": "broker back",
    "kafka-leader": "leader kill -9",
}
# Faults whose streams must outlast several steps (leader kill, follower kill, restarts).
LONG = {"kafka-leader": 4}
# Sampled without a seed, so that an attempt's continuation is its own: the text to expect
# comes from the log (check.owner_truth), not from a reference run.
SAMPLED = {"zombie": 1.0}
ZOMBIE = "worker-0"


# Left out of `make test`'s quick run: the broker's clean stop (its kill -9 is the harder
# case), the zombie (tests/integration/test_zombie_worker.py runs it on its own) and the link
# faults (they need root; tests/integration/test_chaos_network.py runs them on their own).
QUICK_SKIPS = ("kafka", "zombie", *NET_FAULTS)


def default_faults(brokers: int, quick: bool = False) -> list[str]:
    return [
        f
        for f in FAULTS
        if (brokers >= 3 or f not in CLUSTER_FAULTS) and not (quick and f in QUICK_SKIPS)
    ]


# Left out of a soak's default rotation: the client stall holds one socket still for a minute
# (the gateway's own timeout, nothing of the servers), and the brokers' clean stop is the
# slower twin of their kill -9.
SOAK_SKIPS = ("stall", "kafka")


def soak_faults(brokers: int) -> list[str]:
    return [f for f in default_faults(brokers) if f not in SOAK_SKIPS]


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds of "90s", "30m", "1h", "1h30m" (a unit is required: "30" could be either)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 1h or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


RESULTS_DIR = Path("bench") / "results"
DUPLICATE_BILLS = "llmstream_aggregator_duplicate_bills_total"


@dataclass
class Options:
    faults: list[str] = field(default_factory=lambda: default_faults(3))
    brokers: int = 3  # Kafka nodes of the private instance
    requests: int = 100  # per fault, all in flight when it is injected
    sockets: int = 10
    max_tokens: int = 240
    itl_ms: float = 50.0  # synthetic engine: 240 tokens take ~12 s
    kafka_down_s: float = 10.0
    stall_s: float = 60.0
    # Between the leader kill and the follower kill (kafka-leader).
    leader_gap_s: float = 10.0
    # How long a combined fault keeps its server down after the kill (gateway+redis,
    # aggregator+postgres): the restarted or surviving processes work without it meanwhile.
    hold_s: float = 5.0
    # New submits during each fault: one per interval (alternating gateways), at most
    # `max_probes`, each `probe_tokens` long.
    probe_interval_s: float = 0.5
    max_probes: int = 20
    probe_tokens: int = 40
    # Link faults: how long the worker's link is down; the round trip added to the gateway's
    # link to the brokers, and for how long.
    link_down_s: float = 20.0
    link_delay_ms: float = 200.0
    link_delay_s: float = 20.0
    # --soak: how long (0: no soak), the steady traffic between two faults, the sampling.
    soak_s: float = 0.0
    soak_gap_s: float = 120.0
    sample_every_s: float = 60.0
    quick: bool = False

    @classmethod
    def quick_version(cls, **overrides: Any) -> Options:
        """What `make test` runs: fewer and shorter streams, short outages (~2-3 min)."""
        quick = cls(
            faults=default_faults(1, quick=True),
            brokers=1,
            requests=30,
            sockets=6,
            max_tokens=120,
            kafka_down_s=3.0,
            stall_s=5.0,
            leader_gap_s=5.0,
            hold_s=2.0,
            max_probes=8,
            quick=True,
        )
        return replace(quick, **overrides)

    def tokens(self, fault: str) -> int:
        """max_tokens of the fault's requests."""
        return self.max_tokens * LONG.get(fault, 1)
