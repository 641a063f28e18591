"""Model server benchmark (a benchmark, not a test).

    llmstream bench model-server [--ms-only synthetic|llamacpp] [--ms-quick] [--ms-repeat 3]

The server runs as its own process (`llmstream model-server`), the client in this one, both on
this machine, over loopback gRPC.

1. synthetic engine, 1 / 32 / 256 concurrent streams, ttft 0 and itl 0 (tokens as fast as the
   stream takes them): aggregate tokens/s and messages/s seen by the client; server CPU time
   per token (from /proc) minus the synthetic engine's own cost measured in-process = the
   server's overhead per token (gRPC, generation core, detokenization, metrics).
2. synthetic engine paced like a model (itl 20 ms), 256 streams: inter-token latency seen by
   the client vs the configured 20 ms (latency overhead under load).
3. llama.cpp with SmolLM2-135M-Instruct, 1 / 2 / 4 concurrent streams (instances = streams,
   1 thread each), greedy, 128 tokens: aggregate tokens/s through the server vs the same
   token ids decoded by llama-cpp-python directly in this process (one `Llama` per thread,
   `Llama.generate`). Server and direct runs alternate, `--repeat` times (default 3); the
   run with the median tokens/s is reported with the list of all runs (the machine is shared:
   look at `load_average_at_start`).

Results: bench/results/<stamp>-model-server.json (written by `llmstream bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmstream.ports import free_port
from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.testing.model_server import start

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


class ServerProcess:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "llmstream_tools.cli",
            "model-server",
            f"--port={self.port}",
            "--metrics-port=0",
            "--log-level=WARNING",
            "--max-tokens=100000",
            "--max-queue=1024",
            *args,
        ]
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ServerProcess:
        self.proc = await asyncio.create_subprocess_exec(*self.args, cwd=REPO)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        finally:
            await channel.close()
        raise RuntimeError("model server did not become SERVING")

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


async def stream(
    stub: model_service_pb2_grpc.ModelServiceStub,
    msg: model_service_pb2.GenerateStart,
    stats: dict[str, Any],
) -> int:
    clock = time.perf_counter  # uvloop's loop.time() has 1 ms resolution
    t0 = clock()
    last = None
    tokens = 0
    call = stub.Generate()
    await call.write(model_service_pb2.GenerateRequest(start=msg))
    await call.done_writing()
    async for resp in call:
        now = clock()
        if resp.HasField("delta"):
            n = len(resp.delta.token_ids)
            tokens += n
            stats["messages"] += 1
            if last is None:
                stats["ttft"].append(now - t0)
            elif n == 1:
                stats["itl"].append(now - last)
            last = now
        else:
            assert resp.finish.finish_reason in (
                common_pb2.FINISH_REASON_LENGTH,
                common_pb2.FINISH_REASON_STOP,
            ), resp.finish
    return tokens


async def run_streams(
    port: int, model: str, n: int, max_tokens: int, **start_kw: Any
) -> dict[str, Any]:
    stats: dict[str, Any] = {"messages": 0, "ttft": [], "itl": []}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        await stream(
            stub, start(model, max_tokens=2, **start_kw), {"messages": 0, "ttft": [], "itl": []}
        )
        t0 = time.perf_counter()
        c0 = time.process_time()
        counts = await asyncio.gather(
            *(
                stream(
                    stub, start(model, request_id=f"b{i}", max_tokens=max_tokens, **start_kw), stats
                )
                for i in range(n)
            )
        )
        wall = time.perf_counter() - t0
        client_cpu = time.process_time() - c0
    tokens = sum(counts)
    return {
        "streams": n,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "messages_per_s": round(stats["messages"] / wall, 1),
        "tokens_per_message": round(tokens / max(1, stats["messages"]), 2),
        "client_cpu_us_per_token": round(client_cpu / tokens * 1e6, 2),
        "ttft_ms_p50": round(pct(stats["ttft"], 50) * 1e3, 2),
        "ttft_ms_p99": round(pct(stats["ttft"], 99) * 1e3, 2),
        "itl_ms_p50": round(pct(stats["itl"], 50) * 1e3, 3),
        "itl_ms_p99": round(pct(stats["itl"], 99) * 1e3, 3),
    }


async def synthetic_engine_cost(tokens: int = 200_000) -> float:
    """CPU seconds per token of the synthetic engine alone (no gRPC, no core)."""
    from model_server.engines.synthetic import SyntheticEngine
    from model_server.types import EngineRequest, ModelLimits, Sampling

    eng = SyntheticEngine({"ttft_ms": 0, "itl_ms": 0}, ModelLimits(max_concurrency=1))
    await eng.load()
    req = EngineRequest(
        "e", list(b"Hello"), tokens, Sampling(temperature=0.0), arrival=time.monotonic()
    )
    c0 = time.process_time()
    async for _ in eng.generate(req):
        pass
    return (time.process_time() - c0) / tokens


async def bench_synthetic(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    engine_cost = await synthetic_engine_cost(50_000 if quick else 200_000)
    out["synthetic_engine_cpu_us_per_token"] = round(engine_cost * 1e6, 2)
    runs = []
    plan = [(1, 20_000), (32, 1_500), (256, 250)]
    if quick:
        plan = [(1, 3_000), (32, 200), (256, 40)]
    async with ServerProcess(
        "--engine=synthetic", "--synthetic-ttft-ms=0", "--synthetic-itl-ms=0"
    ) as srv:
        for n, max_tokens in plan:
            s0 = cpu_seconds(srv.pid)
            res = await run_streams(srv.port, "synthetic", n, max_tokens)
            server_cpu = cpu_seconds(srv.pid) - s0
            res["server_cpu_us_per_token"] = round(server_cpu / res["tokens"] * 1e6, 2)
            res["server_overhead_us_per_token"] = round(
                server_cpu / res["tokens"] * 1e6 - engine_cost * 1e6, 2
            )
            print(json.dumps({"synthetic_max_rate": res}), file=sys.stderr, flush=True)
            runs.append(res)
    out["max_rate"] = runs
    async with ServerProcess(
        "--engine=synthetic", "--synthetic-ttft-ms=20", "--synthetic-itl-ms=20"
    ) as srv:
        s0 = cpu_seconds(srv.pid)
        res = await run_streams(srv.port, "synthetic", 256, 30 if quick else 100)
        res["server_cpu_us_per_token"] = round((cpu_seconds(srv.pid) - s0) / res["tokens"] * 1e6, 2)
        res["configured_itl_ms"] = 20
        res["configured_ttft_ms"] = 20
        print(json.dumps({"synthetic_paced": res}), file=sys.stderr, flush=True)
        out["paced_256_streams"] = res
    return out


class DirectLlama:
    """N threads, one Llama each (n_threads=1), greedy decode of the same prompt ids: what
    calling llama-cpp-python in-process gives on this machine."""

    def __init__(self, n: int) -> None:
        # Made like the engine's (`new_llama`): with llama.cpp's defaults the weights are
        # repacked for AMX and the first decode segfaults on AMX CPUs.
        from model_server.engines.llamacpp import default_model_path, new_llama

        path = default_model_path()
        self.llms: list[Any] = [
            new_llama(path, n_ctx=2048, n_threads=1, n_threads_batch=1, n_batch=256, n_ubatch=256)
            for _ in range(n)
        ]

    def run(self, ids: list[int], max_tokens: int) -> dict[str, Any]:
        n = len(self.llms)
        counts = [0] * n
        ttfts = [0.0] * n

        def work(i: int) -> None:
            llm = self.llms[i]
            llm.reset()  # no prompt-prefix reuse from an earlier run: evaluate the prompt
            t0 = time.perf_counter()
            for k, _tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
                if k == 0:
                    ttfts[i] = time.perf_counter() - t0
                counts[i] += 1
                if counts[i] >= max_tokens:
                    break

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return {
            "streams": n,
            "tokens": sum(counts),
            "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(counts) / wall, 1),
            "ttft_ms_p50": round(statistics.median(ttfts) * 1e3, 1),
        }

    def close(self) -> None:
        for llm in self.llms:
            llm.close()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median tokens/s, plus the spread of all runs."""
    ordered = sorted(runs, key=lambda r: float(r["tokens_per_s"]))
    mid = dict(ordered[len(ordered) // 2])
    mid["tokens_per_s_all_runs"] = [r["tokens_per_s"] for r in runs]
    return mid


async def bench_llamacpp(quick: bool, repeat: int) -> dict[str, Any]:
    max_tokens = 48 if quick else 128
    text = "Once upon a time, in a small village by the sea, there lived"
    out: dict[str, Any] = {
        "max_tokens": max_tokens,
        "prompt": text,
        "repeats": repeat,
        "server": [],
        "direct": [],
    }
    ids: list[int] = []
    for n in (1, 2, 4):
        direct = await asyncio.to_thread(DirectLlama, n)
        server_runs, direct_runs = [], []
        async with ServerProcess(
            "--engine=llamacpp", f"--llamacpp-instances={n}", "--llamacpp-threads=1"
        ) as srv:
            if not ids:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                    tok = await model_service_pb2_grpc.ModelServiceStub(ch).Tokenize(
                        model_service_pb2.TokenizeRequest(
                            model="smollm2", prompt=common_pb2.Prompt(text=text)
                        )
                    )
                    ids = list(tok.token_ids)
            await asyncio.to_thread(direct.run, ids, 2)  # warm-up
            for _ in range(repeat):  # alternate, so that load from elsewhere hits both
                s0 = cpu_seconds(srv.pid)
                res = await run_streams(srv.port, "smollm2", n, max_tokens, token_ids=ids)
                res["server_cpu_s"] = round(cpu_seconds(srv.pid) - s0, 2)
                server_runs.append(res)
                direct_runs.append(await asyncio.to_thread(direct.run, ids, max_tokens))
        direct.close()
        out["server"].append(median_run(server_runs))
        out["direct"].append(median_run(direct_runs))
        print(json.dumps({"llamacpp_server": out["server"][-1]}), file=sys.stderr, flush=True)
        print(json.dumps({"llamacpp_direct": out["direct"][-1]}), file=sys.stderr, flush=True)
    out["prompt_tokens"] = len(ids)
    return out


def add_arguments(group: Any) -> None:
    group.add_argument("--ms-only", choices=["synthetic", "llamacpp"])
    group.add_argument("--ms-quick", action="store_true", help="small runs (smoke test)")
    group.add_argument("--ms-repeat", type=int, default=3, help="llama.cpp runs per config")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()}
    if args.ms_only in (None, "synthetic"):
        results["synthetic"] = await bench_synthetic(args.ms_quick)
    if args.ms_only in (None, "llamacpp"):
        results["llamacpp"] = await bench_llamacpp(args.ms_quick, args.ms_repeat)
    results["load_average_at_end"] = os.getloadavg()
    results["facts"] = facts(results)
    return results


def facts(results: dict[str, Any]) -> list[dict[str, str]]:
    """Lines for the summary of `llmstream bench`."""
    out = []
    if "synthetic" in results:
        rates = results["synthetic"]["max_rate"]
        out.append(
            {
                "what": "model server alone (gRPC), synthetic zero delay, "
                + " / ".join(str(r["streams"]) for r in rates)
                + " streams",
                "value": " / ".join(f"{r['tokens_per_s']:,.0f}" for r in rates)
                + " tokens/s; server overhead "
                + " / ".join(f"{r['server_overhead_us_per_token']}" for r in rates)
                + " µs/token",
            }
        )
    if "llamacpp" in results:
        lc = results["llamacpp"]
        pairs = zip(lc["server"], lc["direct"], strict=True)
        out.append(
            {
                "what": "model server (gRPC) vs llama-cpp-python in-process, SmolLM2, "
                + " / ".join(str(r["streams"]) for r in lc["server"])
                + " streams",
                "value": " / ".join(
                    f"{s['tokens_per_s']:.0f} vs {d['tokens_per_s']:.0f}" for s, d in pairs
                )
                + " tokens/s",
            }
        )
    return out
