"""`llmstream bench` at a tiny size: every scenario of the harness runs end to end and writes
its results, the combined record, the summary and the plots. (Speed is never asserted in
tests; `make bench` measures it.)"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


async def bench(folder: Path, *args: str, timeout_s: float = 240) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmstream_tools.cli", "bench", *args, "--results-dir", str(folder),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode(), err.decode()


def suite(folder: Path, name: str) -> dict[str, Any]:
    (result_file,) = folder.glob(f"*-{name}.json")
    result: dict[str, Any] = json.loads(result_file.read_text())["result"]
    return result


def combined_file(folder: Path) -> Path:
    (path,) = [p for p in folder.glob("*.json") if "-" not in p.stem]  # <stamp>.json
    return path


def combined(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(combined_file(folder).read_text())
    return data


def raw_profiles_kept(folder: Path) -> set[str]:
    """Processes whose raw py-spy stacks are in the results' profiles/ folder."""
    return {p.stem.split("-paced-6-", 1)[1] for p in (folder / "profiles").glob("*.txt")}


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_clean_run(run: dict[str, Any], requests: int, tokens: int) -> None:
    assert (run["requests"], run["errors"], run["tokens"]) == (requests, 0, tokens), run
    assert run["ttft_ms"]["p50"] > 0
    cdf = run["ttft_cdf_ms"]
    assert len(cdf) == 101 and cdf == sorted(cdf)


async def test_pipeline_paced_and_gateway_scenarios_run_end_to_end(tmp_path: Path) -> None:
    out, err = await bench(
        tmp_path, "pipeline", "paced", "gateway",
        "--pipe-streams", "2", "--pipe-repeat", "1", "--pipe-requests", "2",
        "--pipe-tokens", "8", "--pipe-rates", "10", "--pipe-rate-seconds", "1",
        "--paced-streams", "6", "--paced-tokens", "5", "--paced-ttft-ms", "5",
        "--paced-itl-ms", "5", "--paced-ramp-s", "0.1", "--paced-repeat", "1", "--profile",
        "--gateway-sockets", "20", "--gateway-repeat", "1", "--gateway-hold-s", "0.5",
        "--gateway-requests", "12",
    )  # fmt: skip
    (scenario,) = suite(tmp_path, "pipeline")["scenarios"]
    for path in ("direct", "pipeline"):
        assert_clean_run(scenario[path], requests=4, tokens=4 * 8)
    # CPU per delivered token of each path's processes, and of the load generator
    assert set(scenario["direct"]["cpu_us_per_token_by_process"]) == {
        "model server", "load generator",
    }  # fmt: skip
    assert set(scenario["pipeline"]["cpu_us_per_token_by_process"]) == {
        "model-server", "worker-0", "worker-1", "aggregator", "gateway", "load generator",
    }  # fmt: skip
    for path in ("direct", "pipeline"):
        run = scenario[path]
        assert run["cpu_us_per_token"] == pytest.approx(
            sum(run["cpu_us_per_token_by_process"].values()), abs=0.5
        )
        assert run["cpu_us_per_token_by_process"]["load generator"] > 0
    assert scenario["cpu_us_per_token_ratio"] > 0
    (open_loop,) = suite(tmp_path, "pipeline")["open_loop"]
    for path in ("direct", "pipeline"):
        run = open_loop[path]
        assert run["requests"] > 0 and run["errors"] == 0 and run["tokens"] == 8 * run["requests"]
    paced = suite(tmp_path, "paced")
    (scenario,) = paced["scenarios"]
    for path in ("direct", "pipeline"):
        assert_clean_run(scenario[path], requests=6, tokens=6 * 5)
    assert paced["configured_itl_ms"] == 5 and scenario["offered_tokens_per_s"] == 6 * 200
    assert scenario["direct"]["itl_ms"]["p50"] > 0  # direct messages are spread out in time
    profiled = paced["profile"]
    assert profiled["seconds"] >= 5 and profiled["errors"] == 0
    assert profiled["tokens"] == profiled["rounds"] * 6 * 5
    assert set(profiled["processes"]) == {"gateway", "worker-0", "worker-1"}
    for name, p in profiled["processes"].items():
        assert p["samples"] > 0 and p["self"] and p["inclusive"], (name, p)
        assert sum(f["share"] for f in p["self"]) <= 1.001
    assert raw_profiles_kept(tmp_path) == {"gateway", "worker-0", "worker-1"}
    assert "where the time goes: py-spy, 6 paced streams" in out
    gateway = suite(tmp_path, "gateway")
    (idle,) = gateway["idle"]
    assert (idle["opened"], idle["held"], idle["gateway_alive"]) == (20, 20, True)
    assert idle["gateway_rss_kib_after"] > idle["gateway_rss_kib_before"] > 0
    assert gateway["requests"] == 2  # 12 minus the 10 warm-up requests
    assert gateway["open_files_limit"] >= min(gateway["open_files_wanted"], 1024)
    assert [g["goal"] for g in gateway["goals"]] == [
        "idle WebSocket <= 20 KiB at 20 sockets",
        "10,000 sockets held by one gateway process",
    ]
    assert gateway["goals"][1] == {
        "goal": "10,000 sockets held by one gateway process",
        "result": "MISS",
        "measured": "20 of 20 held (10,000 not tried)",
    }
    pipeline_goals = suite(tmp_path, "pipeline")["goals"]
    assert [g["goal"] for g in pipeline_goals] == [
        "open loop 10 requests/s: added TTFT p50 <= 5 ms",
        "open loop 10 requests/s: added TTFT p99 <= 15 ms",
    ]

    record = combined(tmp_path)
    assert set(record["suites"]) == {"pipeline", "paced", "gateway"}
    machine = record["machine"]
    assert machine["cpus"] >= 1 and machine["cpu_model"] and machine["memory_gib"] > 0
    assert len(machine["git"]["commit"]) == 40 and isinstance(machine["git"]["dirty"], bool)
    assert machine["versions"]["aiokafka"] and machine["versions"]["grpcio"]
    for name in ("pipeline", "paced", "gateway"):
        assert len(record["suites"][name]["load_average_at_start"]) == 3
        assert len(record["suites"][name]["load_average_at_end"]) == 3
    goals = [g for s in record["suites"].values() for g in s["result"].get("goals", [])]
    assert goals and {g["result"] for g in goals} <= {"PASS", "MISS"}
    assert len(record["plots"]) == 3
    for name in record["plots"]:
        assert is_png(tmp_path / name)

    assert "| scenario | path |" in out
    assert "| 1 zero-delay | pipeline | 2 | 4 | 0 |" in out
    assert "| 1 zero-delay open loop | pipeline | 10/s |" in out
    assert "| 2 paced | direct | 6 | 6 | 0 |" in out
    assert "gateway idle WebSocket at 20 sockets" in out
    assert f"goals: {sum(g['result'] == 'PASS' for g in goals)} of {len(goals)} PASS" in out
    assert "PASS" in err or "MISS" in err

    again, _ = await bench(tmp_path, "--report", str(combined_file(tmp_path)), timeout_s=60)
    assert again.strip() == out.strip()


async def test_llamacpp_scenario_runs_against_llama_cpp_server(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp.server.app", reason="needs the llamacpp extra")
    await bench(
        tmp_path, "llamacpp", "--llama-streams", "1", "--llama-requests", "1",
        "--llama-tokens", "4", "--llama-repeat", "1", "--no-plots",
    )  # fmt: skip
    result = suite(tmp_path, "llamacpp")
    (scenario,) = result["scenarios"]
    for path in ("pipeline", "direct", "llama.cpp server"):
        assert_clean_run(scenario[path], requests=1, tokens=4)
    assert scenario["llama_cpp_server_threads"] == 1
    assert {g["result"] for g in result["goals"]} <= {"PASS", "MISS"} and len(result["goals"]) == 2


async def test_kafka_clients_suite_measures_both_clients(tmp_path: Path) -> None:
    out, _ = await bench(
        tmp_path, "kafka-clients", "--kc-records", "100", "--kc-rates", "100",
        "--kc-seconds", "0.2", "--kc-repeat", "1", "--no-plots",
    )  # fmt: skip
    result = suite(tmp_path, "kafka-clients")
    clients = ("aiokafka", "confluent-kafka")
    for runs in result["backlog"].values():
        (run,) = runs
        for client in clients:
            assert run[client]["produce_linger0_cpu_us_per_record"] > 0
            assert run[client]["produce_linger5_records_per_s"] > 0
            assert run[client]["fetch_cpu_us_per_record"] > 0
    for linger in ("0", "5"):
        (run,) = result["low_rate"][linger]["100"]
        for client in clients:
            assert run[client]["records"] == 20
            assert 0 < run[client]["latency_ms_p50"] <= run[client]["latency_ms_p99"]
    steps = result["record_size"]["steps"]
    per_token = [step["kinds"]["1-token + trace"]["bytes_per_token"] for step in steps]
    assert per_token == sorted(per_token, reverse=True) and per_token[0] > per_token[-1]
    assert "| produce, linger 0: CPU µs/record" in out
    assert "| bytes/token, today |" in out


async def test_litellm_suite_compares_both_proxies_on_both_backends(tmp_path: Path) -> None:
    """A real LiteLLM proxy (`make litellm`) in front of the synthetic shim and of
    llama_cpp.server, beside llmstream's SSE endpoint: every path delivers every token, and on
    the synthetic backend the engine's exact text (a differing text is counted as an error)."""
    out, _ = await bench(
        tmp_path, "litellm", "--litellm-streams", "1", "2", "--litellm-requests", "1",
        "--litellm-tokens", "8", "--litellm-llama-tokens", "4", "--litellm-repeat", "1",
        timeout_s=420,
    )  # fmt: skip
    result = suite(tmp_path, "litellm")
    assert "skipped" not in result, result.get("skipped")
    assert result["litellm_version"] == "1.108.7"
    paths = ["llmstream", "llmstream backend", "litellm", "litellm backend"]
    assert result["paths"] == paths
    scenarios = result["scenarios"]
    assert [(s["backend"], s["streams"]) for s in scenarios] == [
        ("synthetic", 1), ("synthetic", 2), ("llamacpp", 1), ("llamacpp", 2),
    ]  # fmt: skip
    for s in scenarios:
        tokens = 8 if s["backend"] == "synthetic" else 4
        requests = s["streams"]
        for path in paths:
            assert_clean_run(s[path], requests=requests, tokens=requests * tokens)
        for who in ("llmstream", "litellm"):
            added = s["added_ttft_ms"][who]
            assert set(added) == {"p50", "p90", "p99", "max"}
            assert added["p50"] == round(
                s[who]["ttft_ms"]["p50"] - s[f"{who} backend"]["ttft_ms"]["p50"], 2
            )
    assert [s.get("text_checked") for s in scenarios[:2]] == [
        ["llmstream", "litellm", "litellm backend"]
    ] * 2
    assert [s["llama_cpp_server_threads"] for s in scenarios[2:]] == [1, 2]
    goals = result["goals"]
    assert len(goals) == 2 * len(scenarios)
    assert {g["result"] for g in goals} <= {"PASS", "MISS"}
    (plot,) = combined(tmp_path)["plots"]
    assert plot.endswith("-litellm.png") and is_png(tmp_path / plot)
    assert "| 6 LiteLLM synthetic | litellm | 2 | 2 | 0 |" in out
    assert "| 6 LiteLLM llamacpp | llmstream | 1 | 1 | 0 |" in out
    assert "llmstream vs LiteLLM proxy, llamacpp backend, 2 stream(s)" in out
