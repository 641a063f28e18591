"""`llmstream bench [SUITE ...]`: run benchmark suites and write their results.

Each service keeps its benchmark next to its code, as `<package>/bench.py` with
`async def run(args) -> dict` (a JSON-ready result) and `add_arguments(parser)`. This module
only finds them, runs them one after another (the machine is shared: never two at once), and
writes `bench/results/<timestamp>-<suite>.json`. Speed is measured here, never asserted in
tests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUITES: dict[str, str] = {
    "model-server": "model_server.bench",
    "worker": "worker.bench",
    "gateway": "gateway.bench",
    "aggregator": "aggregator.bench",
    "pipeline": "llmstream.pipeline_bench",
}

RESULTS_DIR = Path("bench") / "results"


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


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


def main(argv: Sequence[str]) -> int:
    modules = _available()
    parser = argparse.ArgumentParser(prog="llmstream bench", description=__doc__)
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run (default: all built ones: {', '.join(modules) or 'none yet'})",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    for name, module in modules.items():
        group = parser.add_argument_group(name)
        add = getattr(module, "add_arguments", None)
        if add is not None:
            add(group)
    args = parser.parse_args(list(argv))
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
    for name in wanted:
        print(f"== {name}", file=sys.stderr)
        started = time.time()
        result = asyncio.run(modules[name].run(args))
        record = {
            "suite": name,
            "started_at": stamp,
            "seconds": round(time.time() - started, 1),
            "machine": machine(),
            "result": result,
        }
        path = args.results_dir / f"{stamp}-{name}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"results: {path}", file=sys.stderr)
    return 0
