"""The record-size audit (llmstream_tools/bench/kafka_records.py) measures the emitter's own
records, and the compact token event is the smallest of the shapes the worker can write."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmstream_tools.bench import kafka_records as kr
from worker.emitter import Emitter
from worker.lease import ProduceGate


class Capture:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []

    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int, headers: Any
    ) -> asyncio.Future[None]:
        self.sent.append((key, value, list(headers)))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


@pytest.mark.parametrize("trace", [False, True])
@pytest.mark.parametrize("tokens", [1, 8])
async def test_the_audited_compact_record_is_what_the_emitter_sends(
    tokens: int, trace: bool
) -> None:
    rid = kr.request_id(3)
    producer = Capture()
    em = Emitter(
        producer,
        "tokens",
        0,
        kr.envelope(rid, trace),
        gate=ProduceGate(suspect_after_s=3600),
        coalesce_s=0.005,
        coalesce_bytes=4096,
        last_seq=kr.SEQ - 1,
        compact=True,
    )
    await em.push("".join(kr.TOKENS[:tokens]), kr.TOKEN_IDS[:tokens])
    await em.settle()
    assert producer.sent == [kr.token_record(rid, tokens, trace, compact=True)]


def test_each_cut_shrinks_the_record_and_the_compact_one_is_far_smaller() -> None:
    audit = kr.size_audit()
    before = audit["before_issue_21"]["kinds"]["1-token + trace"]["record"]
    rows = [before] + [row["kinds"]["1-token + trace"]["record"] for row in audit["steps"]]
    assert rows == sorted(rows, reverse=True) and rows[0] > rows[1]  # today: no content-type
    assert rows[2] < before / 3  # the compact shape
    assert audit["breakdown_1_token_trace_compact"]["value: request_id"] == 0
    assert audit["breakdown_1_token_trace_compact"]["value: tenant_id"] > 0  # kept (#17)


def shape_sizes(tokens: int, *, compact: bool) -> int:
    """Bytes of a 'tokens'-token record with tracing on, in one token-event shape."""
    key, value, headers = kr.token_record(
        kr.request_id(0), tokens, True, compact=compact, at_ns=kr.AUDIT_TIME_NS
    )
    return kr.record_size(key, value, headers)


def test_docs_quote_the_audit() -> None:
    """docs/events.md's bytes per token event are the audit's (not typed by hand)."""
    text = (Path(__file__).parents[2] / "docs" / "events.md").read_text()
    before = kr.size_audit()["before_issue_21"]["kinds"]
    one = [before["1-token + trace"]["record"]] + [shape_sizes(1, compact=c) for c in (False, True)]
    eight = [before["8-token + trace"]["bytes_per_token"]] + [
        round(shape_sizes(8, compact=c) / 8, 1) for c in (False, True)
    ]
    quoted = (
        f"1 token with tracing on: {one[0]}\nbefore issue 21 (with `content-type`), {one[1]} in "
        f"the full shape, {one[2]} in the compact shape; 8\ncoalesced tokens: {eight[0]:g}, "
        f"{eight[1]:g} and {eight[2]:g} bytes per token."
    )
    assert quoted in text
