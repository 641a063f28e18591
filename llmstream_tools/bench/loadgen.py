"""Load generator of `llmstream bench`: many streaming clients against one target, closed or
open loop, with per-request timings.

Targets share one interface (`llmstream_tools.bench.targets.Target`), so a scenario runs the
same load against each, back to back: WebSockets to a gateway and gRPC straight to a model
server (`targets`), streamed completions of an OpenAI-compatible server (`openai_target`).

Per request a `Sample`: TTFT (submit -> first token), the gaps between stream messages
(inter-token latency; one message carries several tokens where a hop coalesced them), total
time, tokens, error. Connections are opened before the clock starts: production sockets are
long-lived, and a connect storm would otherwise be measured as streaming time.

Load shapes: `closed_loop` (C clients, each sends its next request when the previous ended) and
`open_loop` (Poisson arrivals at a rate, whatever the completions; TTFT counts from the
scheduled arrival, so a stalled generator does not hide latency).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import uvloop

if TYPE_CHECKING:
    from llmstream_tools.bench.targets import Target

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
