"""`llmstream top`: a live terminal summary of the running services' `/metrics`, for people
without Grafana.

Every `--interval` seconds it scrapes each service (defaults: the ports `make up` uses), and
prints sockets, requests/s by outcome, tokens/s, TTFT/ITL percentiles over the last interval
(from histogram buckets, like Prometheus' histogram_quantile), worker in-flight and prompt lag,
aggregator lag, model server running/waiting and errors. `--once` prints one summary and exits.
The metrics are described in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llmstream import config
from llmstream_tools import local_ports
from llmstream_tools import promstats as ps

SERVICES = ("gateway", "model_server", "worker", "aggregator")
# Outcomes that are not errors (worker and gateway `outcome` labels).
OK_OUTCOMES = {"stop", "length", "cancelled", "content_filter", "skipped_terminal"}


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def default_targets() -> dict[str, list[str]]:
    """Where `make up` (llmstream up) serves each service's /metrics."""
    return {
        "gateway": [f"{_local(config.get('GATEWAY_HOST'))}:{local_ports.gateway_metrics_port()}"],
        "model_server": [
            f"{_local(config.get('MODEL_SERVER_HOST'))}:{config.get('MODEL_SERVER_METRICS_PORT')}"
        ],
        "worker": [f"127.0.0.1:{config.get('WORKER_METRICS_PORT')}"],
        "aggregator": [f"127.0.0.1:{config.get('AGGREGATOR_METRICS_PORT')}"],
    }


def url_of(target: str) -> str:
    if "://" not in target:
        target = "http://" + target
    return target if target.rstrip("/").endswith("/metrics") else target.rstrip("/") + "/metrics"


def _fetch(target: str, timeout_s: float) -> ps.Scrape:
    with urllib.request.urlopen(url_of(target), timeout=timeout_s) as resp:
        text = resp.read().decode()
    return ps.parse(text, time.monotonic(), extra={"instance": target})


def scrape(
    targets: dict[str, list[str]], timeout_s: float = 2.0
) -> tuple[dict[str, ps.Scrape], dict[str, str]]:
    """Every target at once: (service -> merged scrape of its reachable targets, unreachable
    target -> why)."""
    jobs = [(svc, t) for svc, ts in targets.items() for t in ts]
    errors: dict[str, str] = {}
    parts: dict[str, list[ps.Scrape]] = {svc: [] for svc in targets}
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = {pool.submit(_fetch, t, timeout_s): (svc, t) for svc, t in jobs}
        for fut, (svc, t) in futures.items():
            try:
                parts[svc].append(fut.result())
            except Exception as exc:  # unreachable, refused, not Prometheus text
                errors[t] = _reason(exc)
    return {svc: ps.merge(p) for svc, p in parts.items() if p}, errors


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason is not None else f"{type(exc).__name__}: {exc}"


# ---- summary (pure) ---------------------------------------------------------------------------


def _hist(now: ps.Scrape, before: ps.Scrape | None, name: str) -> dict[str, float | None]:
    b = ps.buckets(now, name, before)
    return {"p50": ps.quantile(0.5, b), "p99": ps.quantile(0.99, b), "count": b[-1][1] if b else 0}


def _per_s(
    now: ps.Scrape, before: ps.Scrape | None, name: str, window: float | None
) -> float | None:
    if before is None or not window:
        return None
    grown = ps.increase(now, before, name)
    return None if grown is None else grown / window


def _outcomes(
    now: ps.Scrape, before: ps.Scrape | None, name: str, label: str, window: float | None
) -> dict[str, float]:
    """Per-second rate by label over the window, or totals without a previous scrape."""
    if before is None or not window:
        return ps.by_label(now, name, label)
    return {k: v / window for k, v in ps.increase_by_label(now, before, name, label).items()}


def summarize(
    now: dict[str, ps.Scrape], before: dict[str, ps.Scrape] | None = None
) -> dict[str, Any]:
    """Key numbers per service. With `before` (the previous scrape), rates and percentiles
    cover the interval between the two; without, percentiles cover everything since each
    process started and there are no rates."""
    out: dict[str, Any] = {"window_s": None}
    windows = [now[s].at - before[s].at for s in now if before is not None and s in before]
    window = max(windows) if windows else None
    out["window_s"] = window

    def prev(svc: str) -> ps.Scrape | None:
        return before.get(svc) if before is not None else None

    errors: dict[str, float] = {}

    def err(what: str, value: float | None) -> None:
        if value:
            errors[what] = value

    if (g := now.get("gateway")) is not None:
        b = prev("gateway")
        outcomes_total = ps.by_label(g, "gateway_requests_total", "outcome")
        out["gateway"] = {
            "sockets": ps.total(g, "gateway_sockets"),
            "inflight": ps.total(g, "gateway_inflight_requests"),
            "requests_total": ps.total(g, "gateway_requests_total"),
            "requests_per_s": _per_s(g, b, "gateway_requests_total", window),
            "outcomes": _outcomes(g, b, "gateway_requests_total", "outcome", window),
            "refused": {
                k: v
                for k, v in _outcomes(g, b, "gateway_submits_total", "result", window).items()
                if k in ("quota", "overloaded", "draining", "failed")
            },
            "ttft": _hist(g, b, "gateway_time_to_first_token_seconds"),
            "e2e": _hist(g, b, "gateway_e2e_request_latency_seconds"),
            "resumes_total": ps.total(g, "gateway_resumes_total"),
        }
        err(
            "gateway failed requests",
            sum(v for k, v in outcomes_total.items() if k not in OK_OUTCOMES),
        )
        err("gateway invalid frames", ps.total(g, "gateway_invalid_frames_total"))
        err("gateway send-buffer overflows", ps.total(g, "gateway_send_buffer_overflows_total"))
    if (m := now.get("model_server")) is not None:
        b = prev("model_server")
        out["model_server"] = {
            "running": ps.total(m, "llmstream_num_requests_running"),
            "waiting": ps.total(m, "llmstream_num_requests_waiting"),
            "tokens_total": ps.total(m, "llmstream_generation_tokens_total"),
            "tokens_per_s": _per_s(m, b, "llmstream_generation_tokens_total", window),
            "requests_total": ps.total(m, "llmstream_request_success_total"),
            "ttft": _hist(m, b, "llmstream_time_to_first_token_seconds"),
            "itl": _hist(m, b, "llmstream_inter_token_latency_seconds"),
            "queue": _hist(m, b, "llmstream_request_queue_time_seconds"),
        }
        reasons = ps.by_label(m, "llmstream_request_success_total", "finished_reason")
        err("model server errored streams", reasons.get("error"))
        err("model server rejected calls", ps.total(m, "llmstream_requests_rejected_total"))
    if (w := now.get("worker")) is not None:
        b = prev("worker")
        outcomes_total = ps.by_label(w, "llmstream_worker_requests_total", "outcome")
        out["worker"] = {
            "inflight": ps.total(w, "llmstream_worker_inflight"),
            "prompt_lag": ps.total(w, "llmstream_worker_prompt_lag"),
            "prompt_lag_max": ps.maximum(w, "llmstream_worker_prompt_lag"),
            "tokens_per_s": _per_s(w, b, "llmstream_worker_tokens_total", window),
            "requests_total": ps.total(w, "llmstream_worker_requests_total"),
            "retries_total": ps.total(w, "llmstream_worker_retries_total"),
            "takeovers_total": ps.total(w, "llmstream_worker_takeovers_total"),
            "produce": _hist(w, b, "llmstream_worker_produce_latency_seconds"),
        }
        err(
            "worker failed requests",
            sum(v for k, v in outcomes_total.items() if k not in OK_OUTCOMES),
        )
        err("worker dead letters", ps.total(w, "llmstream_worker_dead_letters_total"))
    if (a := now.get("aggregator")) is not None:
        b = prev("aggregator")
        out["aggregator"] = {
            "lag_events": ps.total(a, "llmstream_aggregator_lag_events"),
            "lag_seconds": ps.maximum(a, "llmstream_aggregator_lag_seconds"),
            "events_total": ps.total(a, "llmstream_aggregator_events_total"),
            "events_per_s": _per_s(a, b, "llmstream_aggregator_events_total", window),
        }
        err("aggregator bad events", ps.total(a, "llmstream_aggregator_bad_events_total"))
        err("aggregator duplicate bills", ps.total(a, "llmstream_aggregator_duplicate_bills_total"))
        err(
            "aggregator quota settlement errors",
            ps.total(a, "llmstream_aggregator_quota_settlement_errors_total"),
        )
    out["errors"] = errors
    return out


def _num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def _dur(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 0.001:
        return f"{v * 1e6:.0f}us"
    if v < 1:
        return f"{v * 1000:.1f}ms" if v < 0.01 else f"{v * 1000:.0f}ms"
    return f"{v:.2f}s"


def _pcts(name: str, h: dict[str, float | None]) -> str:
    return f"{name} p50 {_dur(h['p50'])} p99 {_dur(h['p99'])}"


def _labels(values: dict[str, float], digits: int) -> str:
    return " ".join(f"{k} {_num(v, digits)}" for k, v in sorted(values.items()) if v) or "-"


def render(summary: dict[str, Any], unreachable: dict[str, str] | None = None) -> str:
    window = summary.get("window_s")
    per = "/s" if window else ""
    digits = 1 if window else 0
    head = time.strftime("%H:%M:%S")
    if window:
        head += f"  rates and percentiles over the last {window:.1f}s"
    else:
        head += "  totals; percentiles since each process started"
    lines = [f"llmstream top  {head}"]
    g = summary.get("gateway")
    if g is not None:
        rate = f"{_num(g['requests_per_s'], 1)}/s, " if window else ""
        lines.append(
            f"gateway       sockets {_num(g['sockets'])}  in flight {_num(g['inflight'])}  "
            f"requests {rate}{_num(g['requests_total'])} total  "
            f"{_pcts('ttft', g['ttft'])}  {_pcts('e2e', g['e2e'])}"
        )
        lines.append(
            f"              outcomes{per} {_labels(g['outcomes'], digits)}  "
            f"refused{per} {_labels(g['refused'], digits)}  resumes {_num(g['resumes_total'])}"
        )
    m = summary.get("model_server")
    if m is not None:
        rate = f"{_num(m['tokens_per_s'], 1)}/s, " if window else ""
        lines.append(
            f"model server  running {_num(m['running'])}  waiting {_num(m['waiting'])}  "
            f"tokens {rate}{_num(m['tokens_total'])} total  {_pcts('ttft', m['ttft'])}  "
            f"{_pcts('itl', m['itl'])}  queue p99 {_dur(m['queue']['p99'])}"
        )
    w = summary.get("worker")
    if w is not None:
        rate = f"tokens {_num(w['tokens_per_s'], 1)}/s  " if window else ""
        lines.append(
            f"worker        in flight {_num(w['inflight'])}  prompt lag {_num(w['prompt_lag'])} "
            f"(max partition {_num(w['prompt_lag_max'])})  {rate}"
            f"requests {_num(w['requests_total'])} total  retries {_num(w['retries_total'])}  "
            f"takeovers {_num(w['takeovers_total'])}  produce p99 {_dur(w['produce']['p99'])}"
        )
    a = summary.get("aggregator")
    if a is not None:
        rate = f"{_num(a['events_per_s'], 1)}/s, " if window else ""
        lines.append(
            f"aggregator    lag {_num(a['lag_events'])} events / {_num(a['lag_seconds'], 1)}s  "
            f"events {rate}{_num(a['events_total'])} total"
        )
    errors = summary.get("errors") or {}
    lines.append(
        "errors        "
        + (", ".join(f"{k} {_num(v)}" for k, v in errors.items()) if errors else "none")
        + ("  (totals)" if errors else "")
    )
    for target, why in sorted((unreachable or {}).items()):
        lines.append(f"unreachable   {target}: {why}")
    return "\n".join(lines)


# ---- command ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = default_targets()
    p = argparse.ArgumentParser(
        prog="llmstream top",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for svc in SERVICES:
        flag = "--" + svc.replace("_", "-")
        p.add_argument(
            flag,
            default=",".join(d[svc]),
            metavar="HOST:PORT[,...]",
            help=f"{svc.replace('_', ' ')} /metrics addresses (default: %(default)s)",
        )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
    p.add_argument(
        "--once",
        action="store_true",
        help="print one summary and exit (rates over one --interval; 0: totals only)",
    )
    p.add_argument("--json", action="store_true", help="print each summary as one JSON line")
    p.add_argument("--timeout", type=float, default=2.0, help="per-scrape timeout (s)")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    targets = {
        svc: [t.strip() for t in getattr(args, svc).split(",") if t.strip()] for svc in SERVICES
    }
    live = not args.once and sys.stdout.isatty() and not args.json
    before: dict[str, ps.Scrape] | None = None
    if args.once and args.interval > 0:
        before, _ = scrape(targets, args.timeout)
        time.sleep(args.interval)
    try:
        while True:
            now, unreachable = scrape(targets, args.timeout)
            summary = summarize(now, before)
            if args.json:
                print(json.dumps({**summary, "unreachable": unreachable}), flush=True)
            else:
                text = render(summary, unreachable)
                # Redraw in place on a terminal; successive blocks otherwise (pipes, logs).
                print(("\x1b[H\x1b[2J" + text) if live else text + "\n", flush=True)
            if args.once:
                return 0 if now else 1
            before = now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
