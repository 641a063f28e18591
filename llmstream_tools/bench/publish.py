"""Benchmark numbers in the documentation come from committed result files, never by hand.

A result worth quoting is copied into `docs/results/` (committed) and the document holds a
marked block naming it:

    <!-- bench-results: docs/results/20261207T230000Z.json -->
    ...generated text...
    <!-- /bench-results -->

`llmstream bench --update-docs` regenerates every such block in README.md and docs/*.md from
its file (the same summary `llmstream bench` prints), and a unit test fails when a block differs
from what its file renders, so a number can only change by publishing a new run. The file may
be a whole run (`bench/results/<stamp>.json`) or one suite's (`<stamp>-<suite>.json`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BLOCK = re.compile(
    r"(?P<open><!-- bench-results: (?P<src>\S+) -->\n)(?P<body>.*?)(?P<close><!-- /bench-results -->)",
    re.S,
)


def as_run_record(data: dict[str, Any]) -> dict[str, Any]:
    """A whole-run record; a single suite's file is wrapped as a run of that one suite."""
    if "suites" in data:
        return data
    return {
        "started_at": data.get("started_at", "?"),
        "machine": data.get("machine", {}),
        "seconds": data.get("seconds", "?"),
        "suites": {data.get("suite", "suite"): data},
    }


def render(root: Path, src: str) -> str:
    """The block of one result file: a chaos run's own summary, else the benchmarks'."""
    from llmstream_tools.bench.cli import summary
    from llmstream_tools.chaos import report

    data = json.loads((root / src).read_text())
    text = report.summary(data) if data.get("suite") == "chaos" else summary(as_run_record(data))
    return f"Source: `{src}`.\n\n{text}\n"


def rendered(text: str, root: Path) -> str:
    """`text` with every bench-results block regenerated from its source file."""

    def one(m: re.Match[str]) -> str:
        return m.group("open") + render(root, m.group("src")) + m.group("close")

    return BLOCK.sub(one, text)


def sources(text: str) -> list[str]:
    return [m.group("src") for m in BLOCK.finditer(text)]


def documents(root: Path) -> Iterable[Path]:
    yield root / "README.md"
    yield from sorted((root / "docs").glob("*.md"))


def update_docs(root: Path) -> list[Path]:
    """Regenerate every block; returns the documents that changed."""
    changed = []
    for doc in documents(root):
        text = doc.read_text()
        new = rendered(text, root)
        if new != text:
            doc.write_text(new)
            changed.append(doc)
    return changed
