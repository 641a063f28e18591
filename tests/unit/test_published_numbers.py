"""Benchmark numbers in README.md and docs/*.md are generated from committed result files
(llmstream_tools/bench/publish.py): a block that differs from its file's rendering was typed by
hand or is stale (`llmstream bench --update-docs` regenerates it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstream_tools.bench import publish

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", list(publish.documents(ROOT)), ids=lambda p: p.name)
def test_bench_blocks_match_their_result_files(doc: Path) -> None:
    text = doc.read_text()
    for src in publish.sources(text):
        assert (ROOT / src).is_file(), f"{doc.name} quotes {src}, which is not committed"
        assert src.startswith("docs/results/"), f"{src}: published results live in docs/results/"
    assert publish.rendered(text, ROOT) == text, (
        f"{doc.name}: a bench-results block differs from its result file; run "
        "`llmstream bench --update-docs`"
    )


def test_render_wraps_a_single_suite(tmp_path: Path) -> None:
    suite = {
        "suite": "engines",
        "started_at": "20261207T000000Z",
        "seconds": 1.0,
        "machine": {"cpus": 2},
        "result": {"facts": [{"what": "tokens/s", "value": "42"}]},
    }
    (tmp_path / "r.json").write_text(json.dumps(suite))
    doc = "x\n<!-- bench-results: r.json -->\nstale 41\n<!-- /bench-results -->\ny\n"
    out = publish.rendered(doc, tmp_path)
    assert "| tokens/s | 42 |" in out and "stale" not in out
    assert out.startswith("x\n<!-- bench-results: r.json -->\nSource: `r.json`.")
    assert out.endswith("<!-- /bench-results -->\ny\n")
    assert publish.rendered(out, tmp_path) == out
