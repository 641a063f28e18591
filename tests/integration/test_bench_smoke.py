"""`llmstream bench pipeline` at a tiny size: the harness runs and writes its results.
(Speed is never asserted in tests; `make bench` measures it.)"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def read_result(folder: Path) -> dict[str, Any]:
    (result_file,) = folder.glob("*-pipeline.json")
    data: dict[str, Any] = json.loads(result_file.read_text())
    return data


async def test_pipeline_bench_runs_end_to_end(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmstream.cli", "bench", "pipeline",
        "--pipe-streams", "2", "--pipe-repeat", "1", "--pipe-requests", "2",
        "--pipe-tokens", "8", "--results-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()[-3000:]
    record = read_result(tmp_path)
    (scenario,) = record["result"]["scenarios"]
    for path in ("direct", "pipeline"):
        assert scenario[path]["requests"] == 4
        assert scenario[path]["errors"] == 0
        assert scenario[path]["tokens"] == 4 * 8
    assert {g["result"] for g in record["result"]["goals"]} <= {"PASS", "MISS"}
    assert b"PASS" in err or b"MISS" in err
