"""`python -m llmstream_tools.bench.openai_shim --port N`: the synthetic engine's text behind a
minimal OpenAI-compatible server, the zero-cost backend of `llmstream bench litellm`.

LiteLLM's proxy forwards to an OpenAI-compatible HTTP server, not to llmstream's gRPC model
server; this is that server for the synthetic engine. Its text is the engine's own
(model_server/engines/synthetic.py, greedy: token i is a pure function of the prompt's bytes and
the previous token), so a completion through LiteLLM -> shim is the same text as one through
llmstream's gateway -> worker -> synthetic model server, and the benchmark checks both against
`expected_text`. Zero delay: every token is sent as soon as the previous one was written (one
server-sent event per token, as llama.cpp's server does), nothing is scheduled or paced.

Serves `GET /v1/models` and streamed `POST /v1/completions` (with `stream_options.include_usage`,
a last chunk carrying `usage`); anything else is answered 400.
"""

from __future__ import annotations

import argparse
import codecs
import json
import time
import uuid
from collections.abc import Iterator

import uvloop
from aiohttp import web

from model_server.engines.synthetic import next_token, prompt_digest, token_bytes

MODEL = "synthetic"


def completion_pieces(prompt: str, max_tokens: int) -> Iterator[str]:
    """The greedy synthetic completion of `prompt`, one text piece per token (empty while a
    UTF-8 character is split across tokens, as the model server holds it back)."""
    digest = prompt_digest(list(prompt.encode()))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    prev = -1
    for position in range(max_tokens):
        prev = next_token(digest, 0, position, prev)
        yield decoder.decode(token_bytes(prev))


def expected_text(prompt: str, max_tokens: int) -> str:
    return "".join(completion_pieces(prompt, max_tokens))


def _chunk(cid: str, created: int, text: str, finish: str | None) -> bytes:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    body = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": MODEL,
        "choices": [choice],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # LiteLLM may send a one-prompt list
        prompt = prompt[0]
    if not isinstance(prompt, str) or not body.get("stream"):
        raise web.HTTPBadRequest(text="this shim serves streamed completions of one text prompt")
    max_tokens = int(body.get("max_tokens") or 16)
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in completion_pieces(prompt, max_tokens):
        await response.write(_chunk(cid, created, piece, None))
    await response.write(_chunk(cid, created, "", "length"))
    if usage:
        counts = {
            "prompt_tokens": len(prompt.encode()),
            "completion_tokens": max_tokens,
            "total_tokens": len(prompt.encode()) + max_tokens,
        }
        last = {"id": cid, "object": "text_completion", "created": created, "model": MODEL}
        last.update(choices=[], usage=counts)
        await response.write(b"data: " + json.dumps(last).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/v1/models", models)
    application.router.add_post("/v1/completions", completions)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.install()
    web.run_app(app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
