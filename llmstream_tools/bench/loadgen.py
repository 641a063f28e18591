"""Load generator of `llmstream bench`: many streaming clients against one target, closed or
open loop, with per-request timings.

Targets share one interface, so a scenario runs the same load against each, back to back:
- `GatewayTarget`: WebSockets to a gateway (protocol v1, docs/protocol.md): the whole pipeline;
- `DirectTarget`: gRPC `Generate` streams straight to a model server (no Kafka, no gateway);
- `OpenAITarget`: streamed completions (server-sent events) of an OpenAI-compatible HTTP server,
  e.g. `python -m llama_cpp.server`.

Per request a `Sample`: TTFT (submit -> first token), the gaps between stream messages
(inter-token latency; one message carries several tokens where a hop coalesced them), total
time, tokens, error. Connections are opened before the clock starts: production sockets are
long-lived, and a connect storm would otherwise be measured as streaming time.

Load shapes: `closed_loop` (C clients, each sends its next request when the previous ended) and
`open_loop` (Poisson arrivals at a rate, whatever the completions; TTFT counts from the
scheduled arrival, so a stalled generator does not hide latency).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import json
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import grpc
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from llmstream.v1 import common_pb2, model_service_pb2, model_service_pb2_grpc

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
REQUEST_TIMEOUT_S = 120.0  # a request still open after this is counted as an error

PromptFn = Callable[[int, int], str]  # (client, request number) -> prompt text
T = TypeVar("T")


def run_event_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a benchmark on uvloop: a cheaper load generator leaves more of the machine to what
    it measures (it shares the cores with every process under test)."""
    return uvloop.run(coro)


@dataclass(slots=True)
class Sample:
    sent: float = 0.0  # perf_counter at submit (open loop: the scheduled arrival)
    first: float | None = None
    last: float = 0.0
    end: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""

    def message(self, now: float) -> None:
        """A stream message with tokens arrived at `now`."""
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.sent


def quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence (nan when empty)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def quantiles_ms(values_s: Sequence[float], digits: int = 2) -> dict[str, float]:
    ordered = sorted(values_s)
    return {name: round(quantile(ordered, q) * 1000, digits) for name, q in QUANTILES}


def cdf_ms(values_s: Sequence[float], points: int = 101) -> list[float]:
    """`points` evenly spaced quantiles (0 %..100 %) in ms: enough to draw a CDF."""
    ordered = sorted(values_s)
    if not ordered:
        return []
    return [round(quantile(ordered, i / (points - 1)) * 1000, 3) for i in range(points)]


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if not s.error]
    ttfts = [t for s in samples if (t := s.ttft_s) is not None]
    gaps = [g for s in ok for g in s.gaps]
    totals = [s.end - s.sent for s in ok if s.end is not None]
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_kinds": dict(Counter(s.error for s in samples if s.error).most_common(5)),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "wall_s": round(wall_s, 3),
        "ttft_ms": quantiles_ms(ttfts),
        "itl_ms": quantiles_ms(gaps, 3),
        "itl_mean_ms": round(sum(gaps) / len(gaps) * 1000, 3) if gaps else float("nan"),
        "itl_stdev_ms": round(_stdev(gaps) * 1000, 3),
        "total_ms": quantiles_ms(totals),
        "ttft_cdf_ms": cdf_ms(ttfts),
        "itl_cdf_ms": cdf_ms(gaps),
    }


def _stdev(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median tokens/s, with the min/max of every run."""
    ordered = sorted(runs, key=lambda r: float(r["tokens_per_s"]))
    chosen = dict(ordered[len(ordered) // 2])
    chosen["tokens_per_s_min"] = ordered[0]["tokens_per_s"]
    chosen["tokens_per_s_max"] = ordered[-1]["tokens_per_s"]
    chosen["ttft_p50_ms_all_runs"] = [r["ttft_ms"]["p50"] for r in runs]
    chosen["runs"] = len(runs)
    return chosen


# ---- progress ------------------------------------------------------------------------------


class Progress:
    """One status line on stderr (a terminal only), redrawn at most 5 times a second."""

    def __init__(self, label: str, total: int, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.enabled = self.out.isatty()
        self.label, self.total = label, total
        self.done = self.tokens = self.errors = 0
        self.t0 = time.perf_counter()
        self._drawn = 0.0

    def add(self, sample: Sample) -> None:
        self.done += 1
        self.tokens += sample.tokens
        self.errors += bool(sample.error)
        now = time.perf_counter()
        if self.enabled and (now - self._drawn > 0.2 or self.done == self.total):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 24
        filled = width * self.done // max(1, self.total)
        elapsed = max(now - self.t0, 1e-9)
        self.out.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
            f" req  {self.tokens / elapsed:,.0f} tok/s  {self.errors} err  {elapsed:.1f}s\x1b[K"
        )
        self.out.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()


# ---- targets -------------------------------------------------------------------------------


class Target(abc.ABC):
    label: str

    @abc.abstractmethod
    async def open(self, clients: int) -> None:
        """Connect for `clients` concurrent clients (before any clock starts)."""

    @abc.abstractmethod
    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        """One request on behalf of `client`; never raises (errors go into the sample)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Target:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(slots=True)
class _Pending:
    sample: Sample
    done: asyncio.Future[None]


class _Socket:
    """One WebSocket; a reader task times frames as they arrive and sorts them by request."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.by_ref: dict[str, _Pending] = {}
        self.by_id: dict[str, _Pending] = {}
        self.refs = itertools.count()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        clock = time.perf_counter
        try:
            async for raw in self.ws:
                now = clock()
                f = json.loads(raw)
                kind = f.get("type")
                if kind == "token":
                    p = self.by_id.get(f["request_id"])
                    if p is not None:
                        p.sample.message(now)
                elif kind == "accepted":
                    p = self.by_ref.pop(f.get("client_ref", ""), None)
                    if p is not None:
                        self.by_id[f["request_id"]] = p
                elif kind == "done":
                    p = self.by_id.pop(f["request_id"], None)
                    if p is not None:
                        p.sample.end = now
                        p.sample.tokens = int(f.get("usage", {}).get("completion_tokens", 0))
                        if f.get("finish_reason") == "error":
                            p.sample.error = str(f.get("error_code") or "error")
                        _resolve(p)
                elif kind == "error":
                    p = self.by_ref.pop(f.get("client_ref") or "", None) or self.by_id.pop(
                        f.get("request_id") or "", None
                    )
                    if p is not None:
                        p.sample.error = str(f.get("code", "error"))
                        _resolve(p)
        except ConnectionClosed:
            pass
        finally:
            for p in [*self.by_ref.values(), *self.by_id.values()]:
                p.sample.error = p.sample.error or f"socket closed ({self.ws.close_code})"
                _resolve(p)
            self.by_ref.clear()
            self.by_id.clear()

    async def submit(self, frame: dict[str, Any], at: float | None) -> Sample:
        ref = f"r{next(self.refs)}"
        p = _Pending(Sample(), asyncio.get_running_loop().create_future())
        self.by_ref[ref] = p
        data = json.dumps({**frame, "client_ref": ref})
        p.sample.sent = at if at is not None else time.perf_counter()
        try:
            await self.ws.send(data)
            await asyncio.wait_for(asyncio.shield(p.done), REQUEST_TIMEOUT_S)
        except TimeoutError:
            p.sample.error = "client timeout"
        except ConnectionClosed:
            p.sample.error = p.sample.error or "socket closed"
        return p.sample


def _resolve(p: _Pending) -> None:
    if not p.done.done():
        p.done.set_result(None)


class GatewayTarget(Target):
    """The whole pipeline: one WebSocket per client (open loop: requests share the sockets)."""

    def __init__(
        self,
        port: int,
        key: str,
        model: str = "synthetic",
        *,
        host: str = "127.0.0.1",
        temperature: float = 0.0,
        connect_concurrency: int = 32,
        label: str = "pipeline",
    ) -> None:
        self.url = f"ws://{host}:{port}/ws"
        self.key, self.model, self.temperature = key, model, temperature
        self.connect_concurrency = connect_concurrency
        self.label = label
        self.sockets: list[_Socket] = []

    async def open(self, clients: int) -> None:
        slots = asyncio.Semaphore(self.connect_concurrency)

        async def one() -> _Socket:
            async with slots:
                return _Socket(await self._connect())

        got = await asyncio.gather(*(one() for _ in range(clients)), return_exceptions=True)
        self.sockets = [s for s in got if isinstance(s, _Socket)]
        failed = [e for e in got if not isinstance(e, _Socket)]
        if failed:  # the open ones stay in `sockets` (close() closes them)
            raise ConnectionError(f"{len(failed)} of {clients} sockets failed: {failed[0]!r}")

    async def _connect(self) -> ClientConnection:
        """Connect and read `hello`; a refused upgrade (overloaded: 429/5xx) is retried."""
        delay = 0.1
        for attempt in range(10):
            try:
                ws = await connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.key}"},
                    compression=None,
                    max_size=None,
                    open_timeout=60,
                    ping_interval=None,
                )
            except InvalidStatus as exc:
                if exc.response.status_code < 429 or attempt == 9:
                    raise
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            hello = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if hello.get("type") != "hello":
                raise RuntimeError(f"expected hello, got {hello}")
            return ws
        raise AssertionError("unreachable")

    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        frame = {
            "type": "submit",
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        return await self.sockets[client % len(self.sockets)].submit(frame, at)

    async def close(self) -> None:
        sockets, self.sockets = self.sockets, []
        await asyncio.gather(*(s.ws.close() for s in sockets), return_exceptions=True)
        for s in sockets:
            s.reader.cancel()


class DirectTarget(Target):
    """gRPC `Generate` streams straight to a model server, a channel per `per_channel` clients."""

    def __init__(
        self,
        address: str,
        model: str = "synthetic",
        *,
        temperature: float = 0.0,
        per_channel: int = 250,
        label: str = "direct",
    ) -> None:
        self.address, self.model, self.temperature = address, model, temperature
        self.per_channel = per_channel
        self.label = label
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[model_service_pb2_grpc.ModelServiceStub] = []

    async def open(self, clients: int) -> None:
        n = max(1, math.ceil(clients / self.per_channel))
        self.channels = [grpc.aio.insecure_channel(self.address) for _ in range(n)]
        for ch in self.channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        self.stubs = [model_service_pb2_grpc.ModelServiceStub(ch) for ch in self.channels]

    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        clock = time.perf_counter
        sample = Sample()
        start = model_service_pb2.GenerateStart(
            request_id=uuid.uuid4().hex,
            model=self.model,
            prompt=common_pb2.Prompt(text=prompt),
            sampling=common_pb2.SamplingParams(temperature=self.temperature),
            max_tokens=max_tokens,
        )
        sample.sent = at if at is not None else clock()
        call = self.stubs[client % len(self.stubs)].Generate(timeout=REQUEST_TIMEOUT_S)
        try:
            await call.write(model_service_pb2.GenerateRequest(start=start))
            await call.done_writing()
            async for msg in call:
                if msg.HasField("delta"):
                    sample.message(clock())
                    sample.tokens += len(msg.delta.token_ids)
                elif msg.HasField("finish"):
                    sample.end = clock()
                    if msg.finish.finish_reason == common_pb2.FINISH_REASON_ERROR:
                        sample.error = "error"
        except grpc.aio.AioRpcError as err:
            sample.error = err.code().name
        return sample

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        self.channels, self.stubs = [], []


class OpenAITarget(Target):
    """Streamed `/v1/completions` of an OpenAI-compatible server over HTTP/1.1 keep-alive, one
    connection per client (a connection carries one request at a time). Every event without a
    `finish_reason` is one token (llama-cpp-python's server sends one per token, then one with
    the finish reason and no text); `usage`, when present, is used instead (`include_usage`
    asks for it: llmstream's gateway, whose events may carry several tokens, needs it; so does
    its `api_key`)."""

    def __init__(
        self,
        host: str,
        port: int,
        model: str = "",
        *,
        temperature: float = 0.0,
        label: str = "llama.cpp server",
        api_key: str = "",
        include_usage: bool = False,
    ) -> None:
        self.host, self.port, self.model, self.temperature = host, port, model, temperature
        self.label = label
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.include_usage = include_usage
        self.conns: list[_HttpConn] = []

    async def open(self, clients: int) -> None:
        self.conns = [_HttpConn(self.host, self.port) for _ in range(clients)]
        for c in self.conns:
            await c.connect()

    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        conn = self.conns[client % len(self.conns)]
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
        body["temperature"] = self.temperature
        if self.model:
            body["model"] = self.model
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        data = json.dumps(body).encode()
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{self.auth}"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode() + data
        sample = Sample()
        async with conn.lock:
            sample.sent = at if at is not None else time.perf_counter()
            try:
                for attempt in range(2):
                    # The server closes keep-alive connections idle for a few seconds.
                    if conn.closed():
                        await conn.connect()
                    conn.writer.write(request)
                    try:
                        await asyncio.wait_for(
                            self._read_response(conn.reader, sample), REQUEST_TIMEOUT_S
                        )
                        break
                    except _ClosedBeforeAnswer:
                        conn.writer.close()
                        if attempt == 1:
                            raise
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                sample.error = f"{type(exc).__name__}: {exc}"[:120]
        return sample

    async def _read_response(self, reader: asyncio.StreamReader, sample: Sample) -> None:
        line = await reader.readline()
        if not line:
            raise _ClosedBeforeAnswer("connection closed before the status line")
        status = line.decode("latin-1").split()
        if len(status) < 2 or status[1] != "200":
            raise ValueError(f"HTTP status {status}")
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise ValueError("expected a chunked event stream")
        clock = time.perf_counter
        buffer = b""
        usage_tokens: int | None = None
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)  # + CRLF
            if size == 0:
                break
            # sse-starlette separates lines with CRLF; a CR at the end waits for its LF.
            buffer = (buffer + chunk[:-2]).replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            now = clock()
            for event in events:
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue  # comments (pings), ids
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        sample.end = now
                        continue
                    obj = json.loads(payload)
                    if obj.get("usage"):
                        usage_tokens = int(obj["usage"].get("completion_tokens", 0))
                        if not obj.get("choices"):  # include_usage's last chunk: no token
                            continue
                    choices = obj.get("choices") or [{}]
                    if choices[0].get("finish_reason") is None:  # the last event has no token
                        sample.message(now)
                        sample.tokens += 1
        if usage_tokens is not None:
            sample.tokens = usage_tokens
        if sample.end is None:
            sample.end = clock()

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns = []


class _ClosedBeforeAnswer(OSError):
    pass


class _HttpConn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def connect(self) -> None:
        self.close()
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), 30
        )

    def closed(self) -> bool:
        return self._reader is None or self._reader.at_eof() or self.writer.is_closing()

    @property
    def reader(self) -> asyncio.StreamReader:
        assert self._reader is not None
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        assert self._writer is not None
        return self._writer


# ---- load shapes ---------------------------------------------------------------------------


def numbered_prompt(text: str) -> PromptFn:
    """Distinct prompts `text` + client/request numbers (no cache may serve a repeat)."""
    return lambda client, n: f"{text} {client}.{n}"


async def closed_loop(
    target: Target,
    *,
    clients: int,
    requests: int,
    prompt: PromptFn,
    max_tokens: int,
    ramp_s: float = 0.0,
    progress: Progress | None = None,
) -> tuple[list[Sample], float]:
    """`clients` clients, each sending `requests` requests one after another (client i starts
    after `ramp_s` * i / clients). Returns the samples and the wall time."""

    async def client(i: int) -> list[Sample]:
        if ramp_s > 0:
            await asyncio.sleep(ramp_s * i / clients)
        out = []
        for n in range(requests):
            sample = await target.stream(i, prompt(i, n), max_tokens)
            if progress is not None:
                progress.add(sample)
            out.append(sample)
        return out

    t0 = time.perf_counter()
    batches = await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    return [s for batch in batches for s in batch], wall


async def open_loop(
    target: Target,
    *,
    rate: float,
    duration_s: float,
    clients: int,
    prompt: PromptFn,
    max_tokens: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[list[Sample], float]:
    """Poisson arrivals at `rate`/s for `duration_s`, spread over `clients` connections; each
    sample's clock starts at its scheduled arrival."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Sample]] = []
    t0 = time.perf_counter()
    at = 0.0
    for i in itertools.count():
        at += rng.expovariate(rate)
        if at > duration_s:
            break
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(
            target.stream(i % clients, prompt(i % clients, i), max_tokens, at=t0 + at)
        )
        if progress is not None:
            task.add_done_callback(_progress_of(progress))
        tasks.append(task)
    samples = list(await asyncio.gather(*tasks))
    wall = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    return samples, wall


def _progress_of(progress: Progress) -> Callable[[asyncio.Task[Sample]], None]:
    def done(task: asyncio.Task[Sample]) -> None:
        progress.add(task.result())

    return done


# ---- the summary table ---------------------------------------------------------------------


def table_row(
    scenario: str, path: str, concurrency: int | str, run: dict[str, Any]
) -> dict[str, Any]:
    """One line of the summary table from a `summarize`/`median_run` result."""
    return {
        "scenario": scenario,
        "path": path,
        "concurrency": concurrency,
        "requests": run["requests"],
        "errors": run["errors"],
        "tokens_per_s": run["tokens_per_s"],
        "tokens_per_s_min": run.get("tokens_per_s_min", run["tokens_per_s"]),
        "tokens_per_s_max": run.get("tokens_per_s_max", run["tokens_per_s"]),
        "ttft_ms": run["ttft_ms"],
        "itl_ms": run["itl_ms"],
    }


def check(goal: str, ok: bool, measured: str) -> dict[str, str]:
    """One goal of the issue, PASS or MISS (a benchmark never fails on a goal)."""
    return {"goal": goal, "result": "PASS" if ok else "MISS", "measured": measured}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: tokens/s is the median run's, [min-max] over the runs."""
    head = (
        "| scenario | path | conc | req | err | tokens/s (median [min-max]) "
        "| TTFT ms p50 / p90 / p99 / max | ITL ms p50 / p90 / p99 / max |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, i = r["ttft_ms"], r["itl_ms"]
        lines.append(
            f"| {r['scenario']} | {r['path']} | {r['concurrency']} | {r['requests']} "
            f"| {r['errors']} | {r['tokens_per_s']:,.0f} "
            f"[{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}] "
            f"| {_fmt(t['p50'])} / {_fmt(t['p90'])} / {_fmt(t['p99'])} / {_fmt(t['max'])} "
            f"| {_fmt(i['p50'])} / {_fmt(i['p90'])} / {_fmt(i['p99'])} / {_fmt(i['max'])} |"
        )
    return "\n".join(lines)


def _fmt(ms: float) -> str:
    if ms != ms:  # nan
        return "-"
    return f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"
