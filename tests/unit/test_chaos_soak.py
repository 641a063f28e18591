"""The soak's growth verdict (llmstream_tools/chaos/resources.py), its duration syntax and its
part of the published summary; the link faults' choice of addresses (chaos/netns.py)."""

from __future__ import annotations

import argparse
import ipaddress
import os

import pytest

from llmstream_tools.chaos import report
from llmstream_tools.chaos.check import FaultResult, table
from llmstream_tools.chaos.netns import POOL, _listen_ports, free_subnet
from llmstream_tools.chaos.options import (
    NET_FAULTS,
    Options,
    default_faults,
    parse_duration,
    soak_faults,
)
from llmstream_tools.chaos.resources import (
    INFRA,
    SERVICE,
    GrowthLimits,
    Sample,
    judge_growth,
    read_proc,
)
from llmstream_tools.chaos.runner import add_arguments, options_from, record

MIB = 1024


def sample(at: float, rss_mib: float, fds: int, pid: int = 10, quiet: bool = True,
           name: str = "gateway", kind: str = SERVICE) -> Sample:  # fmt: skip
    return Sample(at, "x", quiet, name, kind, pid, int(rss_mib * MIB), fds)


def test_durations_need_a_unit() -> None:
    assert parse_duration("30m") == 1800 and parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400 and parse_duration("2.5m") == 150
    for bad in ("30", "30x", "m", "", "30m garbage", "-5m"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_steady_memory_and_fds_pass() -> None:
    # Start small, grow while warming up (before the first fault ends at 100 s), then level.
    samples = [sample(0, 60, 20), sample(100, 120, 30), sample(200, 125, 31), sample(900, 128, 30)]
    (g,) = judge_growth(samples, warm_from_s=100)
    assert g.verdict == "ok" and g.findings == []
    assert (g.start, g.warm, g.end) == (samples[0], samples[1], samples[3])
    assert g.max_rss_kib == 128 * MIB


def test_rss_growing_past_its_allowance_fails() -> None:
    # 25% of 200 MiB = 50 MiB allowed above warm (more than the 32 MiB floor).
    ok = [sample(100, 200, 30), sample(900, 250, 30)]
    assert judge_growth(ok, 100)[0].verdict == "ok"
    grew = [sample(100, 200, 30), sample(900, 251, 30)]
    (g,) = judge_growth(grew, 100)
    assert g.verdict.startswith("GREW: pid 10 RSS 200 -> 251 MiB")
    # A small process is allowed the 32 MiB floor, not 25% of itself.
    assert judge_growth([sample(100, 40, 5), sample(900, 72, 5)], 100)[0].verdict == "ok"
    assert judge_growth([sample(100, 40, 5), sample(900, 73, 5)], 100)[0].findings


def test_fds_must_come_back_to_their_warm_count() -> None:
    limits = GrowthLimits(fd_slack=16)
    assert judge_growth([sample(100, 50, 30), sample(900, 50, 46)], 100, limits)[0].verdict == "ok"
    (g,) = judge_growth([sample(100, 50, 30), sample(900, 50, 47)], 100, limits)
    assert g.findings == ["pid 10 fds 30 -> 47 (more than 16 over)"]


def test_only_quiet_samples_after_warm_up_are_compared() -> None:
    samples = [
        sample(50, 10, 5),  # before the first fault: warm-up, not compared
        sample(100, 100, 30),
        sample(500, 900, 400, quiet=False),  # under load: in the series, not compared
        sample(900, 101, 30),
    ]
    (g,) = judge_growth(samples, 100)
    assert g.verdict == "ok" and g.max_rss_kib == 900 * MIB


def test_each_incarnation_is_judged_on_its_own() -> None:
    # Killed by a fault at 300: the new pid starts small; comparing across pids would hide a
    # leak (or invent one). The new one leaks.
    samples = [
        sample(100, 100, 30, pid=1),
        sample(200, 101, 30, pid=1),
        sample(400, 50, 20, pid=2),
        sample(900, 200, 20, pid=2),
    ]
    (g,) = judge_growth(samples, 100)
    assert g.pids == [1, 2] and g.verdict.startswith("GREW: pid 2 RSS 50 -> 200 MiB")
    # One quiet sample is not a trend: not judged, and said so.
    (g,) = judge_growth([sample(100, 100, 30, pid=1), sample(900, 500, 30, pid=2)], 100)
    assert g.verdict == "not judged: pid 1: 1 quiet sample(s) after warm-up; pid 2: 1 quiet " \
        "sample(s) after warm-up"  # fmt: skip


def test_infrastructure_is_reported_not_judged() -> None:
    jvm = [sample(100, 300, 200, name="kafka-1", kind=INFRA), sample(900, 900, 200, name="kafka-1",
           kind=INFRA)]  # fmt: skip
    (g,) = judge_growth(jvm, 100)
    assert g.verdict == "reported" and g.findings == []


def test_proc_of_this_process() -> None:
    rss, fds = read_proc(os.getpid()) or (0, 0)
    assert rss > 1024 and fds >= 3
    assert read_proc(2**22 + 7) is None  # above pid_max: no such process


def test_soak_options_and_rotation() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = options_from(parser.parse_args(["--soak", "30m", "--soak-gap", "3m"]))
    assert (opts.soak_s, opts.soak_gap_s) == (1800, 180)
    assert opts.faults == soak_faults(3) and "stall" not in opts.faults
    assert set(NET_FAULTS) <= set(opts.faults) <= set(default_faults(3))
    picked = options_from(parser.parse_args(["--soak", "5m", "--faults", "worker,redis"]))
    assert picked.faults == ["worker", "redis"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--soak", "30"])


def test_a_soak_record_renders_its_growth_and_verdict() -> None:
    result = FaultResult("steady", requests=1, in_flight=1, proof="")
    result.outcomes["kept"] = 1
    data = record(Options(soak_s=600), [result], "20261208T000000Z", 600.0)
    data["soak"] = {
        "seconds": 600.0,
        "rotation": ["worker", "redis"],
        "faults_injected": 2,
        "limits": {"rss_fraction": 0.25, "rss_slack_mib": 32.0, "fd_slack": 16},
        "warm_from_s": 120.0,
        "growth_table": "| process |",
        "growth": [{"name": "gateway", "kind": SERVICE, "pids": [1], "verdict": "GREW: x"}],
        "samples": [],
        "ok": False,
    }
    text = report.summary(data)
    assert "`llmstream chaos --soak 10m`" in text
    assert "Soak: 10 min, 2 faults (rotation: worker, redis)" in text
    assert "more than 25% (at least 32 MiB)" in text and "**1 process(es) grew**: gateway" in text
    assert "Recovery goals" not in text  # no phase had one


def test_a_skipped_link_fault_says_why() -> None:
    skipped = FaultResult("worker-link", skipped="cannot make a network namespace: ip: EPERM")
    assert skipped.ok
    assert (
        table([skipped])
        .splitlines()[-1]
        .endswith("| SKIPPED: cannot make a network namespace: ip: EPERM | all up |")
    )
    data = record(Options(), [skipped], "20261208T000000Z", 10.0)
    assert "Skipped:\n\n- `worker-link`: cannot make a network namespace" in report.summary(data)


def test_link_addresses_avoid_every_network_in_use() -> None:
    first = free_subnet([])
    assert first == ipaddress.IPv4Network("10.254.0.0/30") and first.subnet_of(POOL)
    used = [ipaddress.IPv4Network("10.254.0.0/29"), ipaddress.IPv4Network("10.254.0.8/30")]
    assert free_subnet(used) == ipaddress.IPv4Network("10.254.0.12/30")
    # A route covering the whole pool (e.g. a VPN's 10/8) leaves nothing to pick.
    with pytest.raises(RuntimeError, match="no free /30"):
        free_subnet([ipaddress.IPv4Network("10.0.0.0/8")])


def test_listen_ports_of_a_stack_command() -> None:
    argv = ["model-server", "--port", "5001", "--metrics-port", "0", "--metrics-port", "5002"]
    assert _listen_ports(argv) == [5001, 5002]
    assert _listen_ports(["worker", "--id", "w0"]) == []
