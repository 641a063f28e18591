"""A chaos run's result file as text (pure): the table, what each recovery goal measured, and
what went wrong where. `llmstream chaos` writes the file; README's Reliability section quotes
it through a generated block (`llmstream bench --update-docs`, llmstream_tools/bench/publish.py).
"""

from __future__ import annotations

from typing import Any

from llmstream_tools.chaos.recovery import GOALS


def _spread(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "nothing measured" if not s or not s.get("never") else f"{s['never']} never"
    text = f"p50 {s['p50']:.1f} s, p99 {s['p99']:.1f} s, max {s['max']:.1f} s"
    return text + (f", {s['never']} never" if s.get("never") else "")


def _soak(soak: dict[str, Any]) -> list[str]:
    limits = soak["limits"]
    grew = [g for g in soak["growth"] if g["verdict"].startswith("GREW")]
    verdict = (
        f"**{len(grew)} process(es) grew**: "
        + ", ".join(f"{g['name']} ({g['verdict']})" for g in grew)
        if grew
        else "nothing grew"
    )
    return [
        f"Soak: {soak['seconds'] / 60:.0f} min, {soak['faults_injected']} faults "
        f"(rotation: {', '.join(soak['rotation'])}), steady traffic before and after each. "
        f"RSS and open fds per process, quiet samples (no request in flight) from the first "
        f"fault on: a service fails if its RSS ends more than {limits['rss_fraction']:.0%} "
        f"(at least {limits['rss_slack_mib']:g} MiB) or its fds more than "
        f"{limits['fd_slack']} above its warm sample: {verdict}.",
        "",
        soak["growth_table"],
    ]


def summary(record: dict[str, Any]) -> str:
    opts = record["options"]
    results = record["results"]
    cpus = record.get("machine", {}).get("cpus", "?")
    head = (
        f"Run {record['started_at']}: `llmstream chaos"
        + (f" --soak {opts['soak_s'] / 60:g}m`" if opts.get("soak_s") else "`")
        + f" ({opts['brokers']} broker(s), "
        f"{opts['requests']} requests per fault, {opts['max_tokens']} tokens at "
        f"{opts['itl_ms']:g} ms), {record['seconds'] / 60:.0f} min on {cpus} CPUs; "
        + ("every request kept." if record["ok"] else "**not every fault passed** (below).")
    )
    lines = [head, "", record["table"]]
    if any(r["goal"] for r in results):
        lines += ["", "Recovery goals (issue 18):", ""]
    for r in results:
        if r["goal"]:
            goal = GOALS[r["goal"]]
            measured = r["goal_measure"] or r["stall"]
            lines.append(
                f"- **{r['goal']}** ≤ {goal.limit_s:g} s ({goal.what}), fault `{r['fault']}`: "
                f"**{r['goal_result']}**, {_spread(measured)}"
            )
    skipped = [r for r in results if r.get("skipped")]
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- `{r['fault']}`: {r['skipped']}" for r in skipped]
    if "soak" in record:
        lines += ["", *_soak(record["soak"])]
    failed = [r for r in results if not r["ok"]]
    if failed:
        lines += ["", "What failed:", ""]
        for r in failed:
            why = "; ".join([*r["notes"], *r["examples"]]) or "see the table"
            lines.append(f"- `{r['fault']}`: {why}")
    return "\n".join(lines)
