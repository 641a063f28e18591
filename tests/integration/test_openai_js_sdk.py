"""The official `openai` JavaScript SDK (tests/js, run with node) reads llmstream's chat
completion streams: the frames `ChatCompletionStream` renders, heartbeats included, served over
loopback HTTP. (Against the whole pipeline: tests/integration/test_openai_api.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.openai import sse
from gateway.openai.protocol import StreamContext
from gateway.openai.serving_chat import ChatCompletionStream
from llmstream.fold import RequestState, Status

pytestmark = pytest.mark.integration

JS = Path(__file__).resolve().parents[1] / "js"
NODE = shutil.which("node")
RID = "req_js0001"


def stream_text(tokens: list[str], end: RequestState) -> str:
    """A stream as a watch renders it, with a heartbeat between every two events."""
    stream = ChatCompletionStream(
        StreamContext("chat", RID, "smollm2", 1_700_000_000, 16, include_usage=True)
    )
    parts = [stream.opening()]
    parts += [stream.token(RID, seq, text) for seq, text in enumerate(tokens, 1)]
    parts.append(stream.done(end))
    return sse.HEARTBEAT.join(parts)


class Server:
    """Answers every POST with one canned SSE body; remembers what it was sent."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.requests: list[tuple[str, str | None, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers["Content-Length"])
                sent = json.loads(self.rfile.read(size))
                outer.requests.append((self.path, self.headers.get("Authorization"), sent))
                self.send_response(200)
                for k, v in sse.HEADERS.items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(outer.body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@contextlib.contextmanager
def serve(body: str) -> Iterator[Server]:
    server = Server(body)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def run_js(base_url: str, *args: str, key: str = "lsk_js_test") -> tuple[int, dict[str, Any]]:
    assert NODE is not None, (
        "node is missing: it is on every machine of this kind (make test needs it)"
    )
    assert (JS / "node_modules" / "openai").is_dir(), "the JS SDK is missing: run `make js-deps`"
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": key}
    proc = subprocess.run(
        [NODE, str(JS / "stream_chat.mjs"), *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout.splitlines()[-1])


def end_state(tokens: list[str], **kw: Any) -> RequestState:
    return RequestState(
        RID, last_seq=len(tokens), prompt_tokens=9, completion_tokens=len(tokens), **kw
    )


def test_js_sdk_streams_a_chat_completion() -> None:
    tokens = ["Rivers", " flow", "", " — to the sea ✓"]
    body = stream_text(tokens, end_state(tokens, status=Status.COMPLETED, finish_reason="length"))
    with serve(body) as server:
        code, out = run_js(
            server.url, "--model", "smollm2", "--prompt", "Tell me about rivers.",
            "--max-tokens", "4", "--seed", "7",
        )  # fmt: skip
        assert code == 0, out
        assert out["text"] == "".join(tokens)
        assert (out["role"], out["finish_reason"]) == ("assistant", "length")
        assert out["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        assert out["chunks"] == 6  # role, 3 texts, finish, usage
        [(path, authorization, sent)] = server.requests
        assert (path, authorization) == ("/v1/chat/completions", "Bearer lsk_js_test")
        assert sent == {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Tell me about rivers."}],
            "max_tokens": 4,
            "seed": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def test_js_sdk_raises_the_error_event_of_a_failed_generation() -> None:
    tokens = ["Half"]
    end = end_state(tokens, status=Status.FAILED, finish_reason="error", error_code="internal",
                    finish_message="engine crashed")  # fmt: skip
    with serve(stream_text(tokens, end)) as server:
        code, out = run_js(server.url, "--model", "smollm2", "--prompt", "x", "--max-tokens", "4")
        assert code == 1
        assert out["text"] == "Half"
        assert "engine crashed" in out["error"]["message"]
