"""`llmstream bench [SUITE ...]`: run benchmark suites, print one summary, write the results.

Every suite is a module of llmstream_tools/bench/ (`SUITES`) with `async def run(args) -> dict`
(a JSON-ready result) and `add_arguments(group)`. This module runs them one after another (the
machine is shared: never two at once) on uvloop, and writes `bench/results/<stamp>-<suite>.json`
per suite plus `bench/results/<stamp>.json` (every suite, the summary table, facts and goals)
and PNG plots next to it (llmstream_tools/bench/plots.py). Every file carries the machine
(cores, CPU model, memory), the git commit and whether the tree was dirty, the versions of the
libraries on the measured paths, and the load average before and after.

A suite's result may carry `table` (load-generator rows: llmstream_tools.bench.loadgen.table_row),
`facts` ({what, value}) and `goals` ({goal, result PASS/MISS, measured}); the summary printed at
the end (stdout) is made of those. `llmstream bench --report <stamp>.json` prints it again,
`--publish` copies a run into docs/results/ and regenerates the documents' blocks from it
(llmstream_tools/bench/publish.py). Speed is measured here, never asserted in tests; a missed
goal never fails the command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUITES: dict[str, str] = {
    "model-server": "llmstream_tools.bench.model_server",
    "worker": "llmstream_tools.bench.worker",
    "gateway": "llmstream_tools.bench.gateway",
    "aggregator": "llmstream_tools.bench.aggregator",
    "pipeline": "llmstream_tools.bench.pipeline",
    "paced": "llmstream_tools.bench.paced",
    "llamacpp": "llmstream_tools.bench.llamacpp",
    "engines": "llmstream_tools.bench.engines",
    "sse": "llmstream_tools.bench.sse",
    "kafka-clients": "llmstream_tools.bench.kafka_clients",
    "litellm": "llmstream_tools.bench.litellm_proxy",
    "noisy-neighbour": "llmstream_tools.bench.noisy_neighbour",
    "priority": "llmstream_tools.bench.priority",
    "prefix-affinity": "llmstream_tools.bench.prefix_affinity",
}

RESULTS_DIR = Path("bench") / "results"
# Versions recorded with every result: the libraries on the measured paths.
VERSIONED = (
    "aiokafka", "grpcio", "aiohttp", "websockets", "uvloop", "protobuf", "psycopg", "redis",
    "confluent-kafka", "llama_cpp_python", "py-spy",
)  # fmt: skip


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_state() -> dict[str, Any]:
    """The commit measured and whether the work tree had changes (then the figures are of
    code that is not in any commit)."""
    root = Path(__file__).resolve().parents[2]

    def git(*argv: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "versions": versions(),
        "git": git_state(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(mem_kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _available() -> dict[str, Any]:
    found = {}
    for name, module_name in SUITES.items():
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
    return found


def summary(record: dict[str, Any]) -> str:
    """The summary of a whole run: load table, other facts, goals."""
    from llmstream_tools.bench.loadgen import format_table

    rows, facts, goals = [], [], []
    for suite in record["suites"].values():
        result = suite.get("result", {})
        rows += result.get("table", [])
        facts += result.get("facts", [])
        goals += result.get("goals", [])
    m = record.get("machine", {})
    out = [
        f"`llmstream bench` {record['started_at']} on {m.get('cpus')} CPUs "
        f"({m.get('cpu_model', m.get('processor'))}), {m.get('memory_gib', '?')} GiB, "
        f"Python {m.get('python')}; load average {record.get('load_average_at_start')} at "
        f"start, {record.get('load_average_at_end', '?')} at the end; "
        f"{record.get('seconds', '?')} s.",
        "",
    ]
    git = m.get("git") or {}
    if git.get("commit"):
        dirty = " with uncommitted changes" if git.get("dirty") else ""
        libs = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
        out[0] += f" Commit {git['commit'][:12]}{dirty}; {libs}."
    if rows:
        out += [format_table(rows), ""]
    if facts:
        out += ["| measurement | result |", "|---|---|"]
        out += [f"| {f['what']} | {f['value']} |" for f in facts]
        out.append("")
    if goals:
        out += ["| goal | result | measured |", "|---|---|---|"]
        out += [f"| {g['goal']} | {g['result']} | {g['measured']} |" for g in goals]
        passed = sum(g["result"] == "PASS" for g in goals)
        out += ["", f"goals: {passed} of {len(goals)} PASS"]
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    from llmstream_tools.bench import loadgen

    modules = _available()
    parser = argparse.ArgumentParser(prog="llmstream bench", description=__doc__)
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run (default: all built ones: {', '.join(modules) or 'none yet'})",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--report", type=Path, metavar="JSON", help="print the summary of a saved run and exit"
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="regenerate the bench-results blocks of README.md and docs/*.md from the result "
        "files they name (docs/results/), then exit",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        metavar="JSON",
        help="copy a whole run (bench/results/<stamp>.json) and its plots into docs/results/, "
        "point every bench-results block of the suites it measured at it, regenerate them, exit",
    )
    for name, module in modules.items():
        group = parser.add_argument_group(name)
        add = getattr(module, "add_arguments", None)
        if add is not None:
            add(group)
    args = parser.parse_args(list(argv))
    if args.report is not None:
        from llmstream_tools.bench.publish import as_run_record

        print(summary(as_run_record(json.loads(args.report.read_text()))))
        return 0
    if args.publish is not None:
        from llmstream_tools.bench.publish import publish

        for doc in publish(Path.cwd(), args.publish):
            print(f"updated {doc}", file=sys.stderr)
        return 0
    if args.update_docs:
        from llmstream_tools.bench.publish import update_docs

        for doc in update_docs(Path.cwd()):
            print(f"updated {doc}", file=sys.stderr)
        return 0
    wanted = args.suites or list(modules)
    if not wanted:
        print("llmstream bench: no benchmark suite is built yet", file=sys.stderr)
        return 2
    unknown = [s for s in wanted if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; known: {list(SUITES)}")
    missing = [s for s in wanted if s not in modules]
    if missing:
        print(f"llmstream bench: not built yet: {', '.join(missing)}", file=sys.stderr)
        return 2
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record: dict[str, Any] = {
        "started_at": stamp,
        "machine": machine(),
        "load_average_at_start": _load_average(),
        "command": ["llmstream", "bench", *argv],
        "suites": {},
    }
    began = time.time()
    for name in wanted:
        print(f"== {name}", file=sys.stderr)
        started = time.time()
        load_before = _load_average()
        result = loadgen.run_event_loop(modules[name].run(args))
        suite = {
            "suite": name,
            "started_at": stamp,
            "seconds": round(time.time() - started, 1),
            "machine": record["machine"],
            "load_average_at_start": load_before,
            "load_average_at_end": _load_average(),
            "result": result,
        }
        record["suites"][name] = suite
        path = args.results_dir / f"{stamp}-{name}.json"
        path.write_text(json.dumps(suite, indent=2) + "\n")
        print(f"results: {path} ({suite['seconds']} s)", file=sys.stderr)
    record["seconds"] = round(time.time() - began, 1)
    record["load_average_at_end"] = _load_average()
    if not args.no_plots:
        from llmstream_tools.bench import plots as bench_plots

        plots = bench_plots.write_all(record, args.results_dir, stamp)
        record["plots"] = [p.name for p in plots]
    path = args.results_dir / f"{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"results: {path}; plots: {', '.join(record.get('plots', [])) or 'none'}", file=sys.stderr
    )
    print(summary(record))
    return 0
