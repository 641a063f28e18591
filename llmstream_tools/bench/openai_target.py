"""Streamed completions of an OpenAI-compatible server as a load-generator target
(llmstream_tools/bench/targets.py): llama-cpp-python's server, the LiteLLM proxy, llmstream's
own gateway (docs/openai.md), the synthetic shim (llmstream_tools/bench/openai_shim.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from llmstream_tools.bench.loadgen import REQUEST_TIMEOUT_S, Sample
from llmstream_tools.bench.targets import Target


class OpenAITarget(Target):
    """Streamed `/v1/completions` of an OpenAI-compatible server over HTTP/1.1 keep-alive, one
    connection per client (a connection carries one request at a time). Every event with text
    and without a `finish_reason` is one token (llama-cpp-python's server sends one per token,
    then one with the finish reason and no text); `usage`, when present, is used instead
    (`include_usage` asks for it: llmstream's gateway, whose events may carry several tokens,
    needs it, and so does LiteLLM's proxy, which drops events with empty text; so do their
    `api_key`s). With `expect` (prompt -> the completion's text) a request whose streamed text
    differs is an error, `wrong text`: a path that is fast but loses or garbles text fails."""

    def __init__(
        self,
        host: str,
        port: int,
        model: str = "",
        *,
        temperature: float = 0.0,
        label: str = "llama.cpp server",
        api_key: str = "",
        include_usage: bool = False,
        expect: Callable[[str], str] | None = None,
    ) -> None:
        self.host, self.port, self.model, self.temperature = host, port, model, temperature
        self.label = label
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.include_usage = include_usage
        self.expect = expect
        self.conns: list[_HttpConn] = []

    async def open(self, clients: int) -> None:
        self.conns = [_HttpConn(self.host, self.port) for _ in range(clients)]
        for c in self.conns:
            await c.connect()

    async def stream(
        self, client: int, prompt: str, max_tokens: int, *, at: float | None = None
    ) -> Sample:
        conn = self.conns[client % len(self.conns)]
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
        body["temperature"] = self.temperature
        if self.model:
            body["model"] = self.model
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        data = json.dumps(body).encode()
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{self.auth}"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode() + data
        sample = Sample()
        pieces: list[str] = []
        async with conn.lock:
            sample.sent = at if at is not None else time.perf_counter()
            try:
                for attempt in range(2):
                    # The server closes keep-alive connections idle for a few seconds.
                    if conn.closed():
                        await conn.connect()
                    conn.writer.write(request)
                    try:
                        await asyncio.wait_for(
                            self._read_response(conn.reader, sample, pieces), REQUEST_TIMEOUT_S
                        )
                        break
                    except _ClosedBeforeAnswer:
                        conn.writer.close()
                        if attempt == 1:
                            raise
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                sample.error = f"{type(exc).__name__}: {exc}"[:120]
        if self.expect is not None and not sample.error and "".join(pieces) != self.expect(prompt):
            sample.error = "wrong text"
        return sample

    async def _read_response(
        self, reader: asyncio.StreamReader, sample: Sample, pieces: list[str]
    ) -> None:
        line = await reader.readline()
        if not line:
            raise _ClosedBeforeAnswer("connection closed before the status line")
        status = line.decode("latin-1").split()
        if len(status) < 2 or status[1] != "200":
            raise ValueError(f"HTTP status {status}")
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise ValueError("expected a chunked event stream")
        clock = time.perf_counter
        buffer = b""
        usage_tokens: int | None = None
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)  # + CRLF
            if size == 0:
                break
            # sse-starlette separates lines with CRLF; a CR at the end waits for its LF.
            buffer = (buffer + chunk[:-2]).replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            now = clock()
            for event in events:
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue  # comments (pings), ids
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        sample.end = now
                        continue
                    obj = json.loads(payload)
                    # Only when asked for: LiteLLM puts a zero `usage` in every chunk otherwise.
                    if self.include_usage and obj.get("usage"):
                        usage_tokens = int(obj["usage"].get("completion_tokens", 0))
                    choice = (obj.get("choices") or [{}])[0]
                    text = choice.get("text")
                    if text is not None:
                        pieces.append(text)
                        # the last event (finish_reason) has no token; LiteLLM's usage chunk
                        # carries a choice without text
                        if choice.get("finish_reason") is None:
                            sample.message(now)
                            sample.tokens += 1
        if usage_tokens is not None:
            sample.tokens = usage_tokens
        if sample.end is None:
            sample.end = clock()

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns = []


class _ClosedBeforeAnswer(OSError):
    pass


class _HttpConn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def connect(self) -> None:
        self.close()
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), 30
        )

    def closed(self) -> bool:
        return self._reader is None or self._reader.at_eof() or self.writer.is_closing()

    @property
    def reader(self) -> asyncio.StreamReader:
        assert self._reader is not None
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        assert self._writer is not None
        return self._writer
