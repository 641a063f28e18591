"""The load generator's pure parts (llmstream_tools/bench/loadgen.py): quantiles, summaries, the
table, and the server-sent-event client (openai_target.py) read against a scripted HTTP peer
(chunk boundaries anywhere, CRLF lines, a keep-alive connection the server closes)."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import math

from llmstream_tools.bench import loadgen
from llmstream_tools.bench.loadgen import Sample
from llmstream_tools.bench.openai_target import OpenAITarget


def test_quantiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.quantile(values, 0.5) == 50
    assert loadgen.quantile(values, 0.99) == 99
    assert loadgen.quantile(values, 1.0) == 100
    assert loadgen.quantile(values, 0.0) == 1
    assert math.isnan(loadgen.quantile([], 0.5))
    assert loadgen.cdf_ms([0.003, 0.001, 0.002], points=3) == [1.0, 2.0, 3.0]


def test_summarize_counts_errors_tokens_and_gaps() -> None:
    ok = Sample(sent=0.0, first=0.010, last=0.030, end=0.031, gaps=[0.01, 0.01], tokens=3)
    failed = Sample(sent=0.0, error="overloaded")
    s = loadgen.summarize([ok, failed], wall_s=0.5)
    assert (s["requests"], s["errors"], s["tokens"], s["tokens_per_s"]) == (2, 1, 3, 6.0)
    assert s["error_kinds"] == {"overloaded": 1}
    assert s["ttft_ms"]["p50"] == 10.0
    assert s["itl_ms"]["max"] == 10.0
    assert s["total_ms"]["max"] == 31.0


def test_median_run_reports_the_spread_and_the_table_shows_it() -> None:
    runs = [
        loadgen.summarize([Sample(sent=0, first=0.001, end=0.002, tokens=t)], wall_s=1.0)
        for t in (30, 10, 20)
    ]
    median = loadgen.median_run(runs)
    assert (median["tokens_per_s"], median["tokens_per_s_min"], median["tokens_per_s_max"]) == (
        20.0,
        10.0,
        30.0,
    )
    table = loadgen.format_table([loadgen.table_row("1 zero-delay", "pipeline", 100, median)])
    row = table.splitlines()[-1]
    assert row.startswith("| 1 zero-delay | pipeline | 100 | 1 | 0 | 20 [10-30] | 1.0 /")
    assert row.endswith("| - / - / - / - |")  # no gaps: one message per request


def test_progress_stays_silent_off_a_terminal() -> None:
    out = io.StringIO()
    progress = loadgen.Progress("x", 2, out)
    progress.add(Sample(tokens=5))
    progress.add(Sample(tokens=5, error="e"))
    progress.close()
    assert out.getvalue() == "" and (progress.done, progress.tokens, progress.errors) == (2, 10, 1)


def _event(text: str, finish: str | None = None) -> bytes:
    body = {"choices": [{"text": text, "index": 0, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\r\n\r\n"


async def test_openai_target_reads_chunked_events_and_reconnects() -> None:
    stream = _event("Once") + _event(" upon") + _event("", "length") + b"data: [DONE]\r\n\r\n"
    # Chunk boundaries inside events and between CR and LF.
    crlf = stream.index(b"\r\n\r\n")
    cuts = [0, 5, crlf + 1, crlf + 40, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(cuts)]
    assert all(chunks)  # an empty chunk would end the stream
    requests: list[dict[str, object]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        requests.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for c in chunks:
            writer.write(f"{len(c):x}\r\n".encode() + c + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()  # no keep-alive: the client must reconnect for the next request

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = OpenAITarget("127.0.0.1", port)
    try:
        await target.open(1)
        first = await target.stream(0, "Once", 2)
        await asyncio.sleep(0.05)
        second = await target.stream(0, "Once", 2)
    finally:
        await target.close()
        server.close()
    for s in (first, second):
        assert (s.error, s.tokens) == ("", 2)
        assert s.first is not None and s.end is not None and s.sent < s.first <= s.end
        assert len(s.gaps) == 1
    assert requests[0] == {"prompt": "Once", "max_tokens": 2, "stream": True, "temperature": 0.0}
    assert len(requests) == 2


def _litellm_event(text: str | None, usage: int, finish: str | None = None) -> bytes:
    """LiteLLM's shape: no `text` in the finish chunk, a `usage` in every chunk (zero unless
    asked for), a choice without text in the usage chunk."""
    choice: dict[str, object] = {"index": 0}
    if text is not None:
        choice["text"] = text
    if finish is not None:
        choice["finish_reason"] = finish
    body = {"choices": [choice], "usage": {"completion_tokens": usage}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _one_response(stream: bytes, target_kw: dict[str, object], prompt: str) -> Sample:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(f"{len(stream):x}\r\n".encode() + stream + b"\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    target = OpenAITarget("127.0.0.1", server.sockets[0].getsockname()[1], **target_kw)  # type: ignore[arg-type]
    try:
        await target.open(1)
        return await target.stream(0, prompt, 3)
    finally:
        await target.close()
        server.close()


async def test_openai_target_reads_usage_only_when_asked_and_checks_the_text() -> None:
    stream = (
        _litellm_event("Once", 0) + _litellm_event(" upon", 0) + _litellm_event(" a", 0)
        + _litellm_event(None, 0, "length") + b"data: [DONE]\n\n"
    )  # fmt: skip
    counted = await _one_response(stream, {}, "p")
    assert (counted.error, counted.tokens, len(counted.gaps)) == ("", 3, 2)
    asked = stream.replace(b'"finish_reason": "length"}], "usage": {"completion_tokens": 0}',
                           b'"finish_reason": "length"}], "usage": {"completion_tokens": 7}')  # fmt: skip
    assert (await _one_response(asked, {"include_usage": True}, "p")).tokens == 7
    right = await _one_response(stream, {"expect": lambda p: "Once upon a"}, "p")
    assert right.error == ""
    wrong = await _one_response(stream, {"expect": lambda p: "Once upon the"}, "p")
    assert wrong.error == "wrong text"
