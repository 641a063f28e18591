"""Benchmark numbers in README.md and docs/*.md are generated from committed result files
(llmstream_tools/bench/publish.py): a block that differs from its file's rendering was typed by
hand or is stale (`llmstream bench --update-docs` regenerates it); two documents may not show
the same suite from different runs; the benchmark sections hold no figure outside a block, and
no document holds a measurement-looking figure outside a block (settings are exact values;
measurements are rates, per-token costs, approximations, ranges or percentiles)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from llmstream_tools.bench import publish

ROOT = Path(__file__).resolve().parents[2]

# A number with a unit of what the benchmarks measure.
FIGURE = re.compile(
    r"\d[\d,.]*\s?(?:ms|µs|us/token|KiB|MiB|tokens/s|events/s|records/s|requests/s|bytes)\b"
)
# Benchmark sections: (document, first line of the section, heading that ends it or None).
SECTIONS = [
    ("README.md", "## Performance\n", "## "),
    ("docs/benchmarks.md", "# Benchmarks\n", None),
    ("docs/worker.md", "## Benchmark\n", "## "),
    ("docs/aggregator.md", "## Benchmark\n", "## "),
    ("docs/aggregator.md", "### Daily rollup: a table, not a view (measured)\n", "### "),
]
# Figures in those sections that are settings, sizes of a scenario or goals, not measurements.
NOT_MEASURED = {
    "docs/benchmarks.md": [
        "TTFT 50 ms, 20 ms/token",  # the paced engine's pace
        "20 requests/s for 5 s",  # the open loop's offered rate
        "--pipe-rates` requests/s",
        "20 requests/s): added TTFT p50 ≤ 5 ms, p99 ≤ 15 ms",
        "(20 ms/token): added TTFT p50 ≤ 10 ms, p99 ≤ 30 ms; added inter-token gap p99 ≤ 10 ms",
        "≤ 20 KiB each",
        "≥ 300,000 events/s; projection into PostgreSQL ≥ 50,000 events/s",
        "within +15 ms",
        "one per 5 ms",
        "100 samples/s",
        "`fetch_min_bytes` is 64 KiB",
        "**linger 5 ms**",
        "at linger 5 ms. The *floor*",
        "paced at 200 and 2,000 records/s",
        "100 ms long poll",
        "`fetch_max_wait_ms` 100",
        "10,000 records per kind",
        "5 ms packs them",
        "compare the produce→fetch and CPU rows of linger 0 and 5",
    ],
    "docs/worker.md": ["512 KiB producer batch", "default\n  16 KiB"],
    "docs/aggregator.md": [
        "at least 300,000 events/s",
        "at least\n50,000 events/s",
        "every 50 ms",
        "`--agg-rate` tokens/s",
    ],
    "README.md": [],
}

# What a measurement looks like in prose, unlike a setting ("default 10 s", "max 4 MiB"): a rate
# or a per-token cost, an approximate value ("~8 ms", "about 3 %"), a range ("16-30 s") or a
# percentile ("p99 27 ms", "42 ms p99").
_NUM = r"\d[\d,.]*k?"
_UNIT = r"(?:ms|µs|s|min|h|KiB|MiB|GiB|GB|MB|%)(?![\w/])"
_RATE = r"(?:tokens|tok|events|records|requests|messages|frames)/s"
MEASURED = re.compile(
    rf"{_NUM}\s?(?:{_RATE}|µs\b|[x\u00d7] faster)"
    rf"|(?:~|≈|about |around |roughly )\s?{_NUM}\s?(?:{_UNIT}|{_RATE})"
    rf"|{_NUM}\s?(?:{_UNIT})?\s?[\u2013-]\s?{_NUM}\s?{_UNIT}"
    rf"|\b[pP](?:50|90|95|99)\b[^.\n]{{0,20}}?{_NUM}\s?{_UNIT}"
    rf"|{_NUM}\s?{_UNIT}\s?\(?(?:p50|p90|p95|p99|median|mean)\b"
)
# Measurement-looking figures anywhere in docs/*.md that are settings, scenarios, goals or
# thresholds (besides NOT_MEASURED above, which applies to the whole document too).
SETTINGS = {
    "docs/benchmarks.md": ["paced at 200 and 2,000 records/s"],
    "docs/operations.md": ["a p99 above 2 s over 5-minute windows"],  # an alert's threshold
    "docs/worker.md": [
        "A session of 1\u20131.5 s with heartbeats every\n~300 ms"
    ],  # option not taken
}


def _section(text: str, first: str, end: str | None) -> str:
    start = text.index(first)
    body = text[start + len(first) :]
    if end is not None:
        following = re.search(rf"^{re.escape(end)}", body, re.M)
        body = body[: following.start()] if following else body
    return body


@pytest.mark.parametrize("doc", list(publish.documents(ROOT)), ids=lambda p: p.name)
def test_bench_blocks_match_their_result_files(doc: Path) -> None:
    text = doc.read_text()
    for src, suites in publish.blocks(text):
        if src == publish.UNPUBLISHED:
            assert suites, f"{doc.name}: an unpublished block names the suites it waits for"
            continue
        assert (ROOT / src).is_file(), f"{doc.name} quotes {src}, which is not committed"
        assert src.startswith("docs/results/"), f"{src}: published results live in docs/results/"
        assert publish.shown_suites(ROOT, src, suites), f"{doc.name}: {src} shows no suite"
    assert publish.rendered(text, ROOT) == text, (
        f"{doc.name}: a bench-results block differs from its result file; run "
        "`llmstream bench --update-docs`"
    )


def test_no_two_documents_show_one_suite_from_different_runs() -> None:
    shown: dict[str, set[str]] = {}
    for doc in publish.documents(ROOT):
        for src, suites in publish.blocks(doc.read_text()):
            named = suites if src == publish.UNPUBLISHED else None
            for suite in named or publish.shown_suites(ROOT, src, suites):
                shown.setdefault(suite, set()).add(src)
    differing = {suite: srcs for suite, srcs in shown.items() if len(srcs) > 1}
    assert not differing, f"documents quote different runs for the same suites: {differing}"


@pytest.mark.parametrize(("name", "first", "end"), SECTIONS, ids=lambda x: str(x)[:24])
def test_benchmark_sections_hold_no_hand_typed_figures(
    name: str, first: str, end: str | None
) -> None:
    body = _section((ROOT / name).read_text(), first, end)
    body = publish.BLOCK.sub("", body)
    body = re.sub(r"```.*?```", "", body, flags=re.S)  # commands
    for allowed in NOT_MEASURED[name]:
        body = body.replace(allowed, "")
    typed = FIGURE.findall(body)
    assert not typed, (
        f"{name} ({first.strip()}): figures typed by hand {typed}; quote them through a "
        "bench-results block of a published run (llmstream bench --publish)"
    )


def test_every_exception_is_still_in_its_document() -> None:
    """An exception that no longer occurs would let the same figure in later, unchecked."""
    for name, allowed in NOT_MEASURED.items():
        sections = "".join(
            _section((ROOT / name).read_text(), first, end)
            for doc, first, end in SECTIONS
            if doc == name
        )
        stale = [a for a in allowed if a not in sections]
        assert not stale, f"{name}: exceptions no longer in the text: {stale}"


def _hand_typed_measurements(name: str, text: str) -> list[str]:
    body = publish.BLOCK.sub("", text)
    body = re.sub(r"```.*?```", "", body, flags=re.S)  # commands and examples
    for allowed in NOT_MEASURED.get(name, []) + SETTINGS.get(name, []):
        body = body.replace(allowed, "")
    return [m.group(0) for m in MEASURED.finditer(body)]


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_no_document_holds_a_hand_typed_measurement(doc: Path) -> None:
    name = f"docs/{doc.name}"
    typed = _hand_typed_measurements(name, doc.read_text())
    assert not typed, (
        f"{name}: measurements typed by hand {typed}; quote them through a bench-results block "
        "of a published run (llmstream bench --publish), or say what was measured without the "
        "figure and where to measure it"
    )


@pytest.mark.parametrize(
    "sentence",
    [
        "one stream ~17-21 tokens/s, four ~34 tokens/s aggregate",
        "42 ms p99",
        "p99 27.5 ms",
        "engine start ~10 s instead of 16-30 s",
        "An idle worker uses about 2\u20133 % of a core",
        "27k tokens/s at 32 streams, ~26\u201339 µs server CPU per token",
    ],
)
def test_a_typed_measurement_is_caught(sentence: str) -> None:
    assert _hand_typed_measurements("docs/x.md", f"Measured: {sentence}.\n")


@pytest.mark.parametrize(
    "sentence",
    [
        "within `--start-timeout-s`, default 10 s",
        "rises one class per 10 s waited",
        "`--max-message-bytes` (4 MiB) for receive and send",
        "every 5 s, stops taking requests",
    ],
)
def test_a_setting_is_not_a_measurement(sentence: str) -> None:
    assert _hand_typed_measurements("docs/x.md", f"{sentence}.\n") == []


def test_every_setting_exception_is_still_in_its_document() -> None:
    for name, allowed in SETTINGS.items():
        text = (ROOT / name).read_text()
        stale = [a for a in allowed if a not in text]
        assert not stale, f"{name}: exceptions no longer in the text: {stale}"


def _suite_file(tmp: Path, name: str, facts: list[dict[str, str]]) -> str:
    src = f"docs/results/20261207T000000Z-{name}.json"
    suite = {
        "suite": name,
        "started_at": "20261207T000000Z",
        "seconds": 1.0,
        "machine": {"cpus": 2},
        "result": {"facts": facts},
    }
    (tmp / src).parent.mkdir(parents=True, exist_ok=True)
    (tmp / src).write_text(json.dumps(suite))
    return src


def _run(tmp: Path, suites: dict[str, list[dict[str, str]]], plots: list[str]) -> Path:
    folder = tmp / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "started_at": "20261208T000000Z",
        "machine": {"cpus": 2, "git": {"commit": "a" * 40, "dirty": False}, "versions": {}},
        "seconds": 9.0,
        "load_average_at_start": [1.0, 1.0, 1.0],
        "load_average_at_end": [2.0, 1.0, 1.0],
        "suites": {
            n: {"suite": n, "result": {"facts": f} if f else {"skipped": "not installed"}}
            for n, f in suites.items()
        },
        "plots": plots,
    }
    for plot in plots:
        (folder / plot).write_bytes(b"\x89PNG\r\n\x1a\n")
    run = folder / "20261208T000000Z.json"
    run.write_text(json.dumps(record))
    return run


def test_render_wraps_a_single_suite(tmp_path: Path) -> None:
    src = _suite_file(tmp_path, "engines", [{"what": "tokens/s", "value": "42"}])
    doc = f"x\n<!-- bench-results: {src} -->\nstale 41\n<!-- /bench-results -->\ny\n"
    out = publish.rendered(doc, tmp_path)
    assert "| tokens/s | 42 |" in out and "stale" not in out
    assert out.startswith(f"x\n<!-- bench-results: {src} -->\nSource: `{src}`.")
    assert out.endswith("<!-- /bench-results -->\ny\n")
    assert publish.rendered(out, tmp_path) == out


def test_publish_repoints_every_block_of_the_suites_the_run_measured(tmp_path: Path) -> None:
    old_sse = _suite_file(tmp_path, "sse", [{"what": "sse tokens/s", "value": "1"}])
    old_kc = _suite_file(tmp_path, "kafka-clients", [{"what": "records/s", "value": "7"}])
    old_engines = _suite_file(tmp_path, "engines", [{"what": "vLLM tokens/s", "value": "5"}])
    (tmp_path / "docs" / "a.md").write_text(
        f"<!-- bench-results: {old_sse} -->\n<!-- /bench-results -->\n"
        "<!-- bench-results: - suites=worker -->\n<!-- /bench-results -->\n"
        f"<!-- bench-results: {old_kc} -->\n<!-- /bench-results -->\n"
        f"<!-- bench-results: {old_engines} -->\n<!-- /bench-results -->\n"
        "    <!-- bench-results: docs/results/<stamp>.json -->\n"  # an example, indented
    )
    (tmp_path / "README.md").write_text(
        f"<!-- bench-results: {old_sse} suites=pipeline,sse -->\n<!-- /bench-results -->\n"
    )
    publish.update_docs(tmp_path)
    assert "No run of `worker` is published yet" in (tmp_path / "docs" / "a.md").read_text()
    run = _run(
        tmp_path,
        {
            "sse": [{"what": "sse tokens/s", "value": "2"}],
            "worker": [{"what": "worker µs/token", "value": "3"}],
            "pipeline": [{"what": "pipeline tokens/s", "value": "4"}],
            "engines": [],  # skipped: see below
        },
        ["20261208T000000Z-ttft-cdf.png", "20261208T000000Z-paced-itl-cdf.png"],
    )
    changed = publish.publish(tmp_path, run)
    assert sorted(p.name for p in changed) == ["README.md", "a.md"]
    new = "docs/results/20261208T000000Z.json"
    assert (tmp_path / new).is_file()
    assert (tmp_path / "docs/results/20261208T000000Z-ttft-cdf.png").is_file()
    doc = (tmp_path / "docs" / "a.md").read_text()
    assert publish.blocks(doc) == [
        (new, ["sse"]), (new, ["worker"]), (old_kc, None), (old_engines, None),
    ]  # fmt: skip
    assert "| sse tokens/s | 2 |" in doc and "| worker µs/token | 3 |" in doc
    assert "pipeline tokens/s" not in doc and "ttft-cdf" not in doc  # only the named suites
    assert "Commit aaaaaaaaaaaa;" in doc  # the run's commit is quoted with its figures
    assert "| records/s | 7 |" in doc  # kafka-clients was not in the run: untouched
    assert "| vLLM tokens/s | 5 |" in doc  # engines was skipped in the run: untouched
    readme = (tmp_path / "README.md").read_text()
    assert publish.blocks(readme) == [(new, ["pipeline", "sse"])]
    assert "| pipeline tokens/s | 4 |" in readme and "| sse tokens/s | 2 |" in readme
    assert "`docs/results/20261208T000000Z-ttft-cdf.png`" in readme
    assert "paced-itl-cdf" not in readme  # the paced suite is not shown there
    assert publish.update_docs(tmp_path) == []


def test_publish_refuses_one_suite_file(tmp_path: Path) -> None:
    src = _suite_file(tmp_path, "sse", [])
    with pytest.raises(ValueError, match="one suite's file"):
        publish.publish(tmp_path, tmp_path / src)
