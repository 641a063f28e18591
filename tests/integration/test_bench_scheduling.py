"""`llmstream bench noisy-neighbour priority` at a tiny size: both scheduling suites run end to
end over real Kafka and a synthetic model server, and every request of every case ends by its
max_tokens. (Speed and the goals' PASS/MISS are never asserted here; the bench measures them.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_bench_smoke import bench, suite

pytestmark = pytest.mark.integration


async def test_noisy_neighbour_and_priority_suites_run(tmp_path: Path) -> None:
    out, _ = await bench(
        tmp_path, "noisy-neighbour", "priority", "--no-plots",
        "--nn-burst", "40", "--nn-slots", "8", "--nn-tokens", "5", "--nn-alone", "3",
        "--prio-batch", "30", "--prio-slots", "4", "--prio-tokens", "5",
    )  # fmt: skip
    nn = suite(tmp_path, "noisy-neighbour")
    assert set(nn["cases"]) == {"alone", "fair", "fifo"}
    assert nn["cases"]["alone"]["b_requests"] == 3
    for name in ("alone", "fair", "fifo"):
        r = nn["cases"][name]
        assert r["b_not_length"] == 0 and len(r["b_ttft_ms"]) == r["b_requests"], r
        assert 0 < r["b_ttft_p50_ms"] <= r["b_ttft_p99_ms"], r
    for name in ("fair", "fifo"):
        assert nn["cases"][name]["a_not_length"] == 0 and nn["cases"][name]["a_total_s"] > 0
    prio = suite(tmp_path, "priority")
    for name in ("priority", "log_order"):
        r = prio["cases"][name]
        assert r["batch_finished"] == 30 and r["interactive_ttft_ms"] > 0, r
    goals = [g["goal"] for g in nn["goals"] + prio["goals"]]
    assert len(goals) == 5
    assert "noisy neighbour: B's p99 TTFT under A's burst" in out
    assert "priority: all 30 batch requests still finish" in out
