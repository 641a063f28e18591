"""Benchmark numbers in the documentation come from committed result files, never by hand.

A result worth quoting is copied into `docs/results/` (committed) and the document holds a
marked block naming it, optionally only some of its suites:

    <!-- bench-results: docs/results/20261207T230000Z.json suites=worker -->
    ...generated text...
    <!-- /bench-results -->

`llmstream bench --update-docs` regenerates every such block in README.md and docs/*.md from
its file (the same summary `llmstream bench` prints), and a unit test fails when a block differs
from what its file renders, so a number can only change by publishing a new run. The file may
be a whole run (`bench/results/<stamp>.json`) or one suite's (`<stamp>-<suite>.json`). A block
whose suites were never published names `-` as its file and says so.

`llmstream bench --publish bench/results/<stamp>.json` copies a whole run (and its plots) into
`docs/results/` and points at it every block whose suites that run measured, so that no two
documents quote different runs for the same measure; then it regenerates the blocks.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# A block starts at the beginning of a line (an indented one is an example, not a block).
BLOCK = re.compile(
    r"^(?P<open><!-- bench-results: (?P<src>\S+)(?: suites=(?P<suites>[\w,-]+))? -->\n)"
    r"(?P<body>.*?)(?P<close><!-- /bench-results -->)",
    re.S | re.M,
)
UNPUBLISHED = "-"
PUBLISHED_DIR = Path("docs") / "results"


def as_run_record(data: dict[str, Any]) -> dict[str, Any]:
    """A whole-run record; a single suite's file is wrapped as a run of that one suite."""
    if "suites" in data:
        return data
    return {
        "started_at": data.get("started_at", "?"),
        "machine": data.get("machine", {}),
        "seconds": data.get("seconds", "?"),
        **{k: data[k] for k in ("load_average_at_start", "load_average_at_end") if k in data},
        "suites": {data.get("suite", "suite"): data},
    }


def _suites_filter(m: re.Match[str]) -> list[str] | None:
    return m.group("suites").split(",") if m.group("suites") else None


def file_suites(root: Path, src: str) -> list[str]:
    """The suites a result file holds (a chaos run is the suite `chaos`, a soak `soak`: a
    different measure, so a document may show the latest soak beside the latest full run)."""
    data = json.loads((root / src).read_text())
    if data.get("suite") == "chaos":
        return ["soak"] if data.get("soak") else ["chaos"]
    return list(as_run_record(data)["suites"])


def shown_suites(root: Path, src: str, suites: list[str] | None) -> list[str]:
    """The suites a block renders: those of its file, only the named ones when it names some."""
    if src == UNPUBLISHED:
        return []
    held = file_suites(root, src)
    return [s for s in held if suites is None or s in suites]


def render(root: Path, src: str, suites: list[str] | None = None) -> str:
    """The block of one result file: a chaos run's own summary, else the benchmarks'."""
    from llmstream_tools.bench.cli import summary
    from llmstream_tools.chaos import report

    if src == UNPUBLISHED:
        return (
            f"No run of {', '.join(f'`{s}`' for s in suites or [])} is published yet: `make "
            "bench`, then `llmstream bench --publish bench/results/<stamp>.json`.\n"
        )
    data = json.loads((root / src).read_text())
    if data.get("suite") == "chaos":
        return f"Source: `{src}`.\n\n{report.summary(data)}\n"
    record = as_run_record(data)
    only = ""
    if suites is not None:
        record = {**record, "suites": {k: v for k, v in record["suites"].items() if k in suites}}
        only = f" (suites {', '.join(record['suites'])})"
    plots = [p for p in record.get("plots", []) if (root / src).with_name(p).is_file()]
    shown = "".join(f"\n- `{PUBLISHED_DIR / p}`" for p in plots if _plot_of(p, record))
    plot_lines = f"\n\nPlots:{shown}" if shown else ""
    return f"Source: `{src}`{only}.\n\n{summary(record)}{plot_lines}\n"


# Which suite each plot of `llmstream_tools/bench/plots.py` draws (a filtered block shows
# only its suites' plots).
_PLOT_SUITES = {
    "ttft-cdf": ("pipeline",),
    "tokens-per-s": ("pipeline", "llamacpp"),
    "paced-itl-cdf": ("paced",),
    "litellm": ("litellm",),
}


def _plot_of(name: str, record: dict[str, Any]) -> bool:
    for suffix, suites in _PLOT_SUITES.items():
        if name.endswith(f"-{suffix}.png"):
            return any(s in record["suites"] for s in suites)
    return False


def rendered(text: str, root: Path) -> str:
    """`text` with every bench-results block regenerated from its source file."""

    def one(m: re.Match[str]) -> str:
        return m.group("open") + render(root, m.group("src"), _suites_filter(m)) + m.group("close")

    return BLOCK.sub(one, text)


def blocks(text: str) -> list[tuple[str, list[str] | None]]:
    """(source, suites named or None) of every block of a document."""
    return [(m.group("src"), _suites_filter(m)) for m in BLOCK.finditer(text)]


def sources(text: str) -> list[str]:
    return [src for src, _ in blocks(text)]


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


def repointed(text: str, root: Path, src: str, run_suites: list[str]) -> str:
    """`text` with every block whose suites the run at `src` measured naming that run (a block
    that showed a whole file now names the suites it showed)."""

    def one(m: re.Match[str]) -> str:
        named = _suites_filter(m)
        shown = shown_suites(root, m.group("src"), named)
        wanted = named if m.group("src") == UNPUBLISHED else shown
        if not wanted or not any(s in run_suites for s in wanted):
            return m.group(0)
        if any(s not in run_suites for s in shown):
            return m.group(0)  # the new run would lose something this block shows
        keep = named if named is not None else shown
        return (
            f"<!-- bench-results: {src} suites={','.join(keep)} -->\n"
            + m.group(0)[len(m.group("open")) :]
        )

    return BLOCK.sub(one, text)


def publish(root: Path, run: Path) -> list[Path]:
    """Copy a whole run and its plots into docs/results/, point the blocks at it, regenerate
    them; returns the documents that changed."""
    data = json.loads(run.read_text())
    if "suites" not in data:
        raise ValueError(f"{run} is one suite's file: publish the whole run (<stamp>.json)")
    folder = root / PUBLISHED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run, folder / run.name)
    for plot in data.get("plots", []):
        shutil.copyfile(run.with_name(plot), folder / plot)
    src = str(PUBLISHED_DIR / run.name)
    # A suite the run skipped (its engine not installed) measured nothing: its blocks stay.
    measured = [n for n, suite in data["suites"].items() if "skipped" not in suite["result"]]
    changed = []
    for doc in documents(root):
        text = doc.read_text()
        new = rendered(repointed(text, root, src, measured), root)
        if new != text:
            doc.write_text(new)
            changed.append(doc)
    return changed
