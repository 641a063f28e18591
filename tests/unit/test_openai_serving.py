"""Chat, completions and Responses objects and streams, read by the official `openai` SDK with
strict response validation (its pydantic models of OpenAI's API) over an in-memory transport;
resume from every position of every stream is exact."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response, ResponseFailedEvent, ResponseIncompleteEvent

from gateway.openai import sse
from gateway.openai.errors import OpenAIError
from gateway.openai.following import Renderer
from gateway.openai.protocol import StreamContext, dumps
from gateway.openai.serving_chat import ChatCompletionStream, chat_completion
from gateway.openai.serving_completions import CompletionStream, completion
from gateway.openai.serving_models import model_card, model_list
from gateway.openai.serving_responses import (
    ResponseStream,
    request_id_of,
    response_body,
    response_id,
    response_object,
)
from llmstream import codec
from llmstream.catalog import ModelEntry
from llmstream.fold import RequestState, Status, fold
from llmstream.v1 import common_pb2, events_pb2

RID = "req_5f00c0ffee"
TOKENS = ["Hel", "lo", "", ", wor", "ld — ✓", '\n"quoted"']  # one event without text
TEXT = "".join(TOKENS)
BASE = "http://gateway.test/v1"


def ctx(api: str = "chat", **kw: Any) -> StreamContext:
    fields: dict[str, Any] = {"api": api, "request_id": RID, "model": "smollm2",
                              "created": 1_700_000_000, "max_tokens": 64, **kw}  # fmt: skip
    return StreamContext(**fields)


def final_state(
    tokens: Sequence[str] = TOKENS,
    finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_STOP,
    failed: str | None = None,
    message: str = "",
) -> RequestState:
    """The state a watch has folded at the terminal event of a request that produced `tokens`."""
    events = [codec.new_event(RID, "t-1", "test")]
    events[0].started.attempt = 1
    for seq, text in enumerate(tokens, 1):
        delta = codec.new_event(RID, "t-1", "test")
        delta.token_delta.seq = seq
        delta.token_delta.text = text
        events.append(delta)
    end = codec.new_event(RID, "t-1", "test")
    usage = common_pb2.Usage(prompt_tokens=7, completion_tokens=len(tokens))
    if failed is not None:
        end.failed.CopyFrom(
            events_pb2.RequestFailed(
                code=failed, message=message, usage=usage, last_seq=len(tokens)
            )
        )
    else:
        end.completed.CopyFrom(
            events_pb2.RequestCompleted(
                finish_reason=finish, usage=usage, last_seq=len(tokens), message=message
            )
        )
    state: RequestState | None = None
    for event in [*events, end]:
        state = fold(state, event)
    assert state is not None
    return state


def render(stream: Renderer, state: RequestState, tokens: Sequence[str] = TOKENS) -> str:
    """What a watch sends one SSE client: the opening at once, the token events it still
    needs, the end."""
    out = stream.opening()
    for seq, text in enumerate(tokens, 1):
        if seq > stream.token_after_seq:
            out += stream.token(RID, seq, text)
    return out + stream.done(state)


def client(
    body: str | Callable[[httpx2.Request], httpx2.Response],
    max_retries: int = 0,
    strict: bool = True,
) -> openai.OpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if callable(body):
            return body(request)
        return httpx2.Response(200, headers=sse.HEADERS, content=body.encode())

    return openai.OpenAI(
        api_key="lsk_test",
        base_url=BASE,
        max_retries=max_retries,
        _strict_response_validation=strict,
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )


def json_answer(
    obj: Any, status: int = 200, **headers: str
) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda _: httpx2.Response(status, headers=headers, content=dumps(obj).encode())


def error_answer(err: OpenAIError, calls: list[int]) -> Callable[[httpx2.Request], httpx2.Response]:
    def answer(_: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        headers = {"Content-Type": "application/json", **err.headers()}
        return httpx2.Response(err.status, headers=headers, content=err.json().encode())

    return answer


def events(text: str) -> list[tuple[int | None, str]]:
    """(position, framed event) of each event of a stream."""
    out = []
    for block in text.split("\n\n")[:-1]:
        ids = [line[4:] for line in block.split("\n") if line.startswith("id: ")]
        out.append((int(ids[0].rpartition(":")[2]) if ids else None, block + "\n\n"))
    return out


def data(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


CHAT_ARGS: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


# -- chat ---------------------------------------------------------------------------------------


def test_chat_stream_with_usage_as_the_sdk_reads_it() -> None:
    text = render(ChatCompletionStream(ctx(include_usage=True)), final_state())
    chunks = list(
        client(text).chat.completions.create(
            **CHAT_ARGS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 6 + ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (7, 6)
    assert chunks[-1].usage.total_tokens == 13
    assert all(c.usage is None for c in chunks[:-1])
    assert {(c.id, c.model, c.created, c.object) for c in chunks} == {
        (f"chatcmpl-{RID}", "smollm2", 1_700_000_000, "chat.completion.chunk")
    }
    # Role chunk, 5 texts (the empty event sends nothing), finish, usage; then [DONE].
    assert [p for p, _ in events(text)] == [0, 1, 2, 4, 5, 6, 7, 8, None]
    assert text.endswith("\n\ndata: [DONE]\n\n")


def test_chunks_are_canonical_compact_json() -> None:
    """The hot path builds chunks as text: it must be the JSON `dumps` makes of the object,
    without a `usage` key unless include_usage asked for it."""
    text = render(ChatCompletionStream(ctx()), final_state())
    for raw in data(text)[:-1]:
        assert dumps(json.loads(raw)) == raw
        assert "usage" not in json.loads(raw)
    text = render(CompletionStream(ctx("completions", include_usage=True)), final_state())
    for raw in data(text)[:-1]:
        assert dumps(json.loads(raw)) == raw


def test_chat_stream_failing_midway_ends_with_an_error_event_the_sdk_raises() -> None:
    state = final_state(TOKENS[:2], failed="internal", message="engine crashed")
    text = render(ChatCompletionStream(ctx()), state, TOKENS[:2])
    seen = []
    with pytest.raises(openai.APIError, match="engine crashed") as err:
        for chunk in client(text).chat.completions.create(**CHAT_ARGS, stream=True):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "Hel", "lo"]
    assert err.value.body == {
        "message": "engine crashed", "type": "server_error", "param": None, "code": "internal_error",
    }  # fmt: skip
    assert [p for p, _ in events(text)] == [0, 1, 2, 3, None]  # error at last_seq + 1, [DONE]


def test_chat_completion_body() -> None:
    body = chat_completion(ctx(), final_state(finish=common_pb2.FINISH_REASON_LENGTH))
    answer = client(json_answer(body)).chat.completions.create(**CHAT_ARGS)
    assert answer.id == f"chatcmpl-{RID}"
    assert answer.choices[0].message.content == TEXT
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 6


def test_a_generation_without_an_answer_is_an_http_error_the_sdk_does_not_retry() -> None:
    cancelled = final_state(TOKENS[:1], finish=common_pb2.FINISH_REASON_CANCELLED, message="client")
    with pytest.raises(OpenAIError) as refused:
        chat_completion(ctx(), cancelled)
    calls: list[int] = []
    with pytest.raises(openai.ConflictError) as err:
        client(error_answer(refused.value, calls), max_retries=2).chat.completions.create(
            **CHAT_ARGS
        )
    assert calls == [1]  # x-should-retry: false; a 409 is retried otherwise
    assert (err.value.status_code, err.value.code) == (409, "request_cancelled")
    assert err.value.message.endswith("The request was cancelled: client")


# -- completions --------------------------------------------------------------------------------


def test_completion_stream_and_body() -> None:
    text = render(CompletionStream(ctx("completions", include_usage=True)), final_state())
    # Not strict: the SDK types a streamed completion chunk like the final object (finish_reason
    # never null), but OpenAI streams null until the finish chunk, as we do.
    chunks = list(
        client(text, strict=False).completions.create(
            model="smollm2", prompt="Hi", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 13
    assert [p for p, _ in events(text)] == [1, 2, 4, 5, 6, 7, 8, None]  # no opening chunk
    body = completion(ctx("completions"), final_state())
    answer = client(json_answer(body)).completions.create(model="smollm2", prompt="Hi")
    assert (answer.id, answer.choices[0].text, answer.choices[0].finish_reason) == (
        f"cmpl-{RID}", TEXT, "stop",
    )  # fmt: skip


# -- responses ----------------------------------------------------------------------------------


def test_response_stream_as_the_sdk_accumulates_it() -> None:
    text = render(ResponseStream(ctx("responses")), final_state())
    with client(text).responses.stream(model="smollm2", input="Hi") as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == TEXT
    assert (final.id, final.status, final.model) == (response_id(RID), "completed", "smollm2")
    assert final.usage is not None and final.usage.output_tokens == 6
    assert seen == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 5,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip


def test_response_events_are_numbered_like_their_positions() -> None:
    raw = list(client(render(ResponseStream(ctx("responses")), final_state())).responses.create(
        model="smollm2", input="Hi", stream=True
    ))  # fmt: skip
    numbers = [e.sequence_number for e in raw]
    assert numbers == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]  # seq k -> k + 3; L=6 -> 10..13
    text = render(ResponseStream(ctx("responses")), final_state())
    assert [p for p, _ in events(text)] == numbers
    assert "[DONE]" not in text


@pytest.mark.parametrize(
    ("state", "terminal", "status", "detail"),
    [
        (final_state(finish=common_pb2.FINISH_REASON_LENGTH), "response.incomplete", "incomplete",
         "max_output_tokens"),
        (final_state(finish=common_pb2.FINISH_REASON_CANCELLED), "response.incomplete",
         "cancelled", None),
        (final_state(TOKENS[:2], failed="internal", message="engine crashed"), "response.failed",
         "failed", "server_error"),
        (final_state(finish=common_pb2.FINISH_REASON_TIMEOUT), "response.failed", "failed",
         "server_error"),
    ],
)  # fmt: skip
def test_responses_that_end_without_completing(
    state: RequestState, terminal: str, status: str, detail: str | None
) -> None:
    raw = list(client(render(ResponseStream(ctx("responses")), state, state.text_parts)).responses.create(
        model="smollm2", input="Hi", stream=True
    ))  # fmt: skip
    last = raw[-1]
    assert isinstance(last, ResponseIncompleteEvent | ResponseFailedEvent)
    assert last.type == terminal
    assert last.response.status == status
    assert last.response.output[0].type == "message"
    assert last.response.output_text == state.text
    if status == "incomplete":
        assert last.response.incomplete_details is not None
        assert last.response.incomplete_details.reason == detail
    if status == "failed":
        assert last.response.error is not None and last.response.error.code == detail


def test_retrieving_a_response_in_any_state() -> None:
    c = ctx("responses", background=True, temperature=0.2)

    def retrieve(obj: dict[str, Any]) -> Response:
        return client(json_answer(obj)).responses.retrieve(response_id(RID))

    queued = retrieve(response_object(c, None))
    assert (queued.status, queued.output, queued.background, queued.usage) == (
        "queued",
        [],
        True,
        None,
    )
    running = RequestState(RID, status=Status.RUNNING, last_seq=2, text_parts=["Hel", "lo"])
    partial = retrieve(response_object(c, running))
    assert (partial.status, partial.output_text, partial.temperature) == (
        "in_progress",
        "Hello",
        0.2,
    )
    done = retrieve(response_body(c, final_state()))
    assert (done.status, done.output_text, done.max_output_tokens) == ("completed", TEXT, 64)
    assert done.usage is not None and done.usage.total_tokens == 13


def test_resumed_response_stream_through_the_sdk() -> None:
    seen: list[httpx2.URL] = []
    stream_text = render(ResponseStream(ctx("responses"), after=5), final_state())

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.url)
        return httpx2.Response(200, headers=sse.HEADERS, content=stream_text.encode())

    raw = list(client(answer).responses.retrieve(response_id(RID), stream=True, starting_after=5))
    assert seen[0].path == f"/v1/responses/{response_id(RID)}"
    assert (seen[0].params["stream"], seen[0].params["starting_after"]) == ("true", "5")
    assert raw[0].sequence_number == 7  # 6 is the empty token event: nothing to send
    assert "".join(e.delta for e in raw if e.type == "response.output_text.delta") == "".join(
        TOKENS[3:]
    )


def test_response_ids() -> None:
    assert request_id_of(response_id(RID)) == RID
    for bad in (RID, "resp_"):
        with pytest.raises(OpenAIError) as err:
            request_id_of(bad)
        assert err.value.status == 404


# -- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "state"),
    [
        (lambda after: ChatCompletionStream(ctx(include_usage=True), after), final_state()),
        (lambda after: ChatCompletionStream(ctx(), after),
         final_state(TOKENS[:3], failed="model_unavailable", message="no replica")),
        (lambda after: CompletionStream(ctx("completions", include_usage=True), after),
         final_state()),
        (lambda after: ResponseStream(ctx("responses"), after), final_state()),
        (lambda after: ResponseStream(ctx("responses", background=True), after),
         final_state(finish=common_pb2.FINISH_REASON_CANCELLED)),
    ],
)  # fmt: skip
def test_resuming_after_any_event_continues_exactly(
    make: Callable[[int], Renderer], state: RequestState
) -> None:
    """A client that got the events up to position k and reconnects (any replica: the stream
    is rebuilt from the log) receives exactly the rest, byte for byte."""
    tokens = state.text_parts
    full = events(render(make(-1), state, tokens))
    positions = [p for p, _ in full if p is not None]
    assert positions == sorted(set(positions))
    for k in range(-1, positions[-1] + 2):
        rest = "".join(e for p, e in full if p is None or p > k)
        assert render(make(k), state, tokens) == rest, f"after {k}"


# -- models -------------------------------------------------------------------------------------


def test_model_list_from_the_catalog() -> None:
    entries = [
        ModelEntry("smollm2", "q4", "llamacpp", 2048, 1024, 2, ("ms:1",), "w-1", 1_700_000_123_456, 10_000),
        ModelEntry("synthetic", "1", "synthetic", 0, 4096, 64, ("ms:2",), "w-1", 1_700_000_000_000, 10_000),
    ]  # fmt: skip
    listed = list(client(json_answer(model_list(entries))).models.list())
    assert [(m.id, m.object, m.owned_by, m.created) for m in listed] == [
        ("smollm2", "model", "llmstream", 1_700_000_123),
        ("synthetic", "model", "llmstream", 1_700_000_000),
    ]
    card = model_card(entries[0])
    assert (card["max_model_len"], card["max_tokens"]) == (2048, 1024)
    assert model_card(entries[1])["max_model_len"] is None  # unknown, not zero
    one = client(json_answer(card)).models.retrieve("smollm2")
    assert one.id == "smollm2"
