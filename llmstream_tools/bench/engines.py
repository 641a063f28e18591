"""vLLM vs llama.cpp on the same SmolLM2-135M-Instruct weights (a benchmark, not a test).

    llmstream bench engines [--eng-quick] [--eng-repeat 3]

The same prompt ids (tokenized once by the llama.cpp model server; the converted tokenizer
gives the same ids), greedy, `max_tokens` new tokens per stream, 1 and 4 concurrent streams,
each engine measured two ways in one run:

- **through our model server**: a `llmstream model-server` process, this process streaming
  over loopback gRPC (`bench.model_server.run_streams`): aggregate tokens/s and the client's
  time to first token;
- **directly in-process**: llama-cpp-python's `Llama.generate` in threads (`DirectLlama`), and
  vLLM's `AsyncLLM.generate` with exactly the engine arguments of our adapter, in a child
  process under the vLLM virtualenv (`python -m llmstream_tools.bench.engines`).

Engine settings are the servers' defaults for these stream counts: llama.cpp one instance
(single-thread) per stream; vLLM one engine with max_num_seqs 4 and the CPU defaults of
`model_server/engines/vllm.py` (float32, eager, 512 MiB KV cache; vLLM uses one torch thread
for serving on this 2-core machine). Each configuration runs `--eng-repeat` times, server and
direct alternating (both vLLM engines stay loaded, ~3.7 GiB each); the run with the median
tokens/s is reported with all runs (the machine is shared: see the load averages). Greedy runs may end early at the
end-of-sequence token; tokens are counted, not assumed.

Results: bench/results/<stamp>-engines.json (written by `llmstream bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmstream.ports import free_port
from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc
from llmstream_tools.bench.model_server import DirectLlama, cpu_seconds, median_run, run_streams
from model_server import vllm_env

PROMPT = "Once upon a time, in a small village by the sea, there lived"
STREAMS = (1, 4)
MARKER = "engines-bench-result: "


def add_arguments(group: Any) -> None:
    group.add_argument("--eng-quick", action="store_true", help="small runs (smoke test)")
    group.add_argument("--eng-repeat", type=int, default=3, help="runs per configuration")


@contextlib.asynccontextmanager
async def model_server(*args: str) -> AsyncIterator[tuple[int, int]]:
    """A `llmstream model-server` process: (port, pid) once it is SERVING."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmstream_tools.cli",
        "model-server",
        f"--port={port}",
        "--metrics-port=0",
        "--log-level=WARNING",
        "--max-tokens=100000",
        *args,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:  # vLLM loads in 10-40 s here; it either serves or exits
                if proc.returncode is not None:
                    raise RuntimeError(f"model server {args} exited with {proc.returncode}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                await asyncio.sleep(0.2)
        yield port, proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def prompt_ids(port: int) -> list[int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        tok = await model_service_pb2_grpc.ModelServiceStub(channel).Tokenize(
            model_service_pb2.TokenizeRequest(
                model="smollm2", prompt=common_pb2.Prompt(text=PROMPT)
            )
        )
    return list(tok.token_ids)


async def server_runs(
    port: int, pid: int, n: int, ids: list[int], max_tokens: int
) -> dict[str, Any]:
    s0 = cpu_seconds(pid)
    res = await run_streams(port, "smollm2", n, max_tokens, token_ids=ids)
    res["server_cpu_s"] = round(cpu_seconds(pid) - s0, 2)
    return res


async def bench_llamacpp(ids: list[int], max_tokens: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"server": [], "direct": []}
    for n in STREAMS:
        direct = await asyncio.to_thread(DirectLlama, n)
        server, inproc = [], []
        args = ("--engine=llamacpp", f"--llamacpp-instances={n}", "--llamacpp-threads=1")
        async with model_server(*args) as (port, pid):
            await asyncio.to_thread(direct.run, ids, 2)  # warm-up
            for _ in range(repeat):  # alternate, so that load from elsewhere hits both
                server.append(await server_runs(port, pid, n, ids, max_tokens))
                inproc.append(await asyncio.to_thread(direct.run, ids, max_tokens))
        direct.close()
        out["server"].append(median_run(server))
        out["direct"].append(median_run(inproc))
        report("llamacpp", out, -1)
    return out


async def bench_vllm(ids: list[int], max_tokens: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"server": [], "direct": []}
    async with (
        model_server("--engine=vllm", f"--max-concurrency={max(STREAMS)}") as (port, pid),
        direct_vllm_process(ids, max_tokens) as direct,
    ):
        for n in STREAMS:
            server, inproc = [], []
            for _ in range(repeat):  # alternate, so that load from elsewhere hits both
                server.append(await server_runs(port, pid, n, ids, max_tokens))
                inproc.append(await direct(n))
            out["server"].append(median_run(server))
            out["direct"].append(median_run(inproc))
            report("vllm", out, -1)
    return out


def report(engine: str, out: dict[str, Any], i: int) -> None:
    line = {engine: {"server": out["server"][i], "direct": out["direct"][i]}}
    print(json.dumps(line), file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def direct_vllm_process(
    ids: list[int], max_tokens: int
) -> AsyncIterator[Callable[[int], Awaitable[dict[str, Any]]]]:
    """vLLM in-process, in a child under the vLLM virtualenv (this module's ``main``): one
    JSON line in (streams), one result line out; vLLM's own log lines are skipped."""
    python = sys.executable if vllm_env.vllm_importable() else str(vllm_env.vllm_python())
    child = await asyncio.create_subprocess_exec(
        python,
        "-m",
        "llmstream_tools.bench.engines",
        json.dumps({"ids": ids, "max_tokens": max_tokens}),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout

    async def reply() -> Any:
        while line := (await stdout.readline()).decode():
            if line.startswith(MARKER):
                return json.loads(line.removeprefix(MARKER))
        raise RuntimeError(f"the in-process vLLM run exited with {await child.wait()}")

    async def run(n: int) -> dict[str, Any]:
        stdin.write(f"{n}\n".encode())
        await stdin.drain()
        result: dict[str, Any] = await reply()
        return result

    try:
        await reply()  # loaded
        yield run
    finally:
        stdin.close()
        await child.wait()


# -- vLLM in-process (runs under the vLLM virtualenv) --------------------------------------------
async def direct_vllm(ids: list[int], max_tokens: int) -> None:
    """AsyncLLM with the adapter's engine arguments, no gRPC, no generation core: runs
    ``n`` concurrent streams for every line ``n`` on stdin."""
    from model_server.engines.vllm import engine_args, import_vllm
    from model_server.types import ModelLimits

    api = import_vllm()
    limits = ModelLimits(max_concurrency=max(STREAMS))
    args = engine_args({"model": vllm_env.default_model()}, limits, api.on_cpu)
    llm = api.AsyncLLM.from_engine_args(api.AsyncEngineArgs(**args))
    params = api.SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        detokenize=False,
        output_kind=api.RequestOutputKind.DELTA,
    )
    runs = itertools.count()

    async def stream(rid: str, p: Any) -> tuple[int, float]:
        t0 = time.perf_counter()
        tokens, ttft = 0, 0.0
        async for out in llm.generate(api.tokens_input(ids), p, rid):
            if not tokens and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            tokens += len(out.outputs[0].token_ids)
        return tokens, ttft

    try:
        await stream("warm-up", api.SamplingParams(temperature=0.0, max_tokens=2))
        print(MARKER + "null", flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            n, r = int(line), next(runs)
            t0 = time.perf_counter()
            done = await asyncio.gather(*(stream(f"d{r}.{i}", params) for i in range(n)))
            wall = time.perf_counter() - t0
            tokens = sum(t for t, _ in done)
            result = {
                "streams": n,
                "tokens": tokens,
                "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1),
                "ttft_ms_p50": round(statistics.median(t for _, t in done) * 1e3, 1),
            }
            print(MARKER + json.dumps(result), flush=True)
    finally:
        llm.shutdown()


# -- the suite ---------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not vllm_env.vllm_importable() and not os.access(vllm_env.vllm_python(), os.X_OK):
        raise RuntimeError(f"the engines suite needs vLLM: {vllm_env.INSTALL_HINT}")
    max_tokens = 32 if args.eng_quick else 128
    repeat = 1 if args.eng_quick else args.eng_repeat
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()}
    async with model_server("--engine=llamacpp", "--llamacpp-instances=1") as (port, _pid):
        ids = await prompt_ids(port)
    results.update(prompt=PROMPT, prompt_tokens=len(ids), max_tokens=max_tokens, repeats=repeat)
    results["llamacpp"] = await bench_llamacpp(ids, max_tokens, repeat)
    results["vllm"] = await bench_vllm(ids, max_tokens, repeat)
    results["load_average_at_end"] = os.getloadavg()
    results["rows"] = rows(results)
    results["facts"] = facts(results)
    return results


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (engine, streams): server and direct side by side."""
    out = []
    for engine in ("llamacpp", "vllm"):
        r = results[engine]
        for server, direct in zip(r["server"], r["direct"], strict=True):
            out.append(
                {
                    "engine": engine,
                    "streams": server["streams"],
                    "server_tokens_per_s": server["tokens_per_s"],
                    "direct_tokens_per_s": direct["tokens_per_s"],
                    "server_ttft_ms_p50": server["ttft_ms_p50"],
                    "direct_ttft_ms_p50": direct["ttft_ms_p50"],
                    "server_tokens_per_s_all_runs": server["tokens_per_s_all_runs"],
                    "direct_tokens_per_s_all_runs": direct["tokens_per_s_all_runs"],
                }
            )
    return out


def facts(results: dict[str, Any]) -> list[dict[str, str]]:
    """Lines for the summary of `llmstream bench`."""
    return [
        {
            "what": f"{r['engine']} SmolLM2-135M, {r['streams']} stream(s): tokens/s and TTFT "
            "p50, our server vs in-process",
            "value": f"{r['server_tokens_per_s']:.0f} vs {r['direct_tokens_per_s']:.0f} tok/s; "
            f"{r['server_ttft_ms_p50']:.0f} vs {r['direct_ttft_ms_p50']:.0f} ms",
        }
        for r in results["rows"]
    ]


def main(argv: Sequence[str]) -> int:
    """The in-process vLLM runs (``direct_vllm_process`` drives them)."""
    spec = json.loads(argv[0])
    asyncio.run(direct_vllm(spec["ids"], spec["max_tokens"]))
    return 0


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it imports this module
    sys.exit(main(sys.argv[1:]))
