"""The generation core with a scripted engine: no gRPC, no model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from model_server.engine import Engine, EngineInfo
from model_server.errors import EngineError
from model_server.generation import Delta, Finished, Generation
from model_server.types import (
    EngineRequest,
    EngineStep,
    Finish,
    ModelLimits,
    PromptInput,
    Sampling,
    TokenLogprobs,
)

EOS = 0


class ScriptedEngine(Engine):
    """Yields scripted steps (token id = byte value); records aborts and closes."""

    kind = "scripted"

    def __init__(self, steps: list[EngineStep], delay: float = 0.0, fail_at: int = -1) -> None:
        super().__init__({}, ModelLimits())
        self.steps = steps
        self.delay = delay
        self.fail_at = fail_at
        self.aborted: list[str] = []
        self.closed = False
        self.calls = 0
        self._info = EngineInfo(
            vocab_size=256, eos_token_ids=frozenset({EOS}), max_context=1000, version="1"
        )

    async def load(self) -> None: ...

    async def close(self) -> None: ...

    async def tokenize(self, prompt: PromptInput) -> list[int]:
        return list((prompt.text or "").encode())

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id == EOS else bytes((token_id,))

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineStep, None]:
        self.calls += 1
        req.scheduled_at = req.arrival + 0.001
        try:
            for i, step in enumerate(self.steps):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if req.request_id in self.aborted:
                    yield EngineStep([], [], finish=Finish.CANCELLED)
                    return
                if i == self.fail_at:
                    raise EngineError("boom")
                yield step
        finally:
            self.closed = True

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    @property
    def running(self) -> int:
        return 0

    @property
    def waiting(self) -> int:
        return 0

    def active_requests(self) -> frozenset[str]:
        return frozenset()


def steps_for(text: str, chunk: int = 1, finish: Finish | None = Finish.LENGTH) -> list[EngineStep]:
    data = text.encode()
    out = [
        EngineStep(list(data[i : i + chunk]), [100.0 + i] * len(data[i : i + chunk]))
        for i in range(0, len(data), chunk)
    ]
    if finish is not None:
        out[-1].finish = finish
    return out


def request(
    *, max_new: int = 100, cont: list[int] | None = None, stop: tuple[str, ...] = ()
) -> EngineRequest:
    return EngineRequest(
        request_id="r#1",
        prompt_token_ids=[1, 2, 3],
        max_new_tokens=max_new,
        sampling=Sampling(temperature=0.0, stop=stop),
        continuation_token_ids=cont or [],
        arrival=99.0,
    )


async def run(gen: Generation) -> tuple[list[Delta], Finished]:
    deltas: list[Delta] = []
    finals: list[Finished] = []
    async for ev in gen.run():
        (deltas if isinstance(ev, Delta) else finals).append(ev)  # type: ignore[arg-type]
    assert len(finals) == 1
    return deltas, finals[0]


async def test_deltas_are_numbered_and_usage_adds_up() -> None:
    eng = ScriptedEngine(steps_for("héllo wörld", chunk=2))
    deltas, fin = await run(Generation(eng, request(cont=[65, 66]), model_name="m"))
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d.text for d in deltas) == "héllo wörld"
    assert fin.reason is Finish.LENGTH
    assert fin.prompt_tokens == 3
    new = sum(len(d.token_ids) for d in deltas)
    assert fin.completion_tokens == 2 + new  # continuation + new tokens
    assert fin.last_seq == len(deltas)
    # Engine clock: arrival 99.0, scheduled 99.001, first token 100.0, last 112.0.
    assert fin.queue_us == 1000
    assert fin.time_to_first_token_us == 1_000_000
    assert fin.total_us == 13_000_000


async def test_stop_string_cuts_a_merged_step_at_the_right_token() -> None:
    eng = ScriptedEngine(steps_for("abc STOP def", chunk=12))  # one step with every token
    deltas, fin = await run(Generation(eng, request(stop=("STOP",)), model_name="m"))
    assert fin.reason is Finish.STOP
    assert "".join(d.text for d in deltas) == "abc "
    ids = [t for d in deltas for t in d.token_ids]
    assert bytes(ids) == b"abc STOP"  # up to the token that completed the stop string
    assert fin.completion_tokens == len(ids)
    assert "r#1" in eng.aborted and eng.closed


async def test_continuation_ending_in_eos_finishes_without_the_engine() -> None:
    eng = ScriptedEngine(steps_for("xyz"))
    deltas, fin = await run(Generation(eng, request(cont=[65, EOS]), model_name="m"))
    assert deltas == [] and fin.reason is Finish.STOP and eng.calls == 0
    assert fin.completion_tokens == 2


async def test_continuation_containing_a_stop_string_finishes_without_the_engine() -> None:
    eng = ScriptedEngine(steps_for("xyz"))
    cont = list(b"say END")
    _, fin = await run(Generation(eng, request(cont=cont, stop=("END",)), model_name="m"))
    assert fin.reason is Finish.STOP and eng.calls == 0


async def test_no_budget_left_finishes_with_length() -> None:
    eng = ScriptedEngine(steps_for("xyz"))
    gen = Generation(eng, request(max_new=0), model_name="m", length_message="context full")
    deltas, fin = await run(gen)
    assert deltas == [] and fin.reason is Finish.LENGTH and fin.message == "context full"


async def test_cancel_aborts_the_engine_and_names_the_reason() -> None:
    eng = ScriptedEngine(steps_for("a" * 100), delay=0.005)
    gen = Generation(eng, request(), model_name="m")
    deltas: list[Delta] = []
    fin: Finished | None = None
    async for ev in gen.run():
        if isinstance(ev, Delta):
            deltas.append(ev)
            if len(deltas) == 3:
                gen.cancel("user")
        else:
            fin = ev
    assert fin is not None and fin.reason is Finish.CANCELLED and fin.message == "user"
    assert len(deltas) == 3  # nothing after the cancel
    assert eng.aborted == ["r#1"]
    gen.cancel("again")  # no-op once finished
    assert fin.completion_tokens == 3


async def test_request_timeout_finishes_with_timeout() -> None:
    eng = ScriptedEngine(steps_for("a" * 100), delay=0.01)
    gen = Generation(eng, request(), model_name="m", request_timeout_s=0.05)
    deltas, fin = await run(gen)
    assert fin.reason is Finish.TIMEOUT
    assert "0.05s" in fin.message
    assert 1 <= len(deltas) < 20


async def test_engine_error_finishes_with_error() -> None:
    eng = ScriptedEngine(steps_for("abcdef"), fail_at=3)
    deltas, fin = await run(Generation(eng, request(), model_name="m"))
    assert fin.reason is Finish.ERROR and fin.message == "boom"
    assert len(deltas) == 3 and fin.completion_tokens == 3


async def test_stream_without_finish_is_an_error() -> None:
    eng = ScriptedEngine(steps_for("abc", finish=None))
    _, fin = await run(Generation(eng, request(), model_name="m"))
    assert fin.reason is Finish.ERROR and "early" in fin.message


async def test_closing_the_stream_early_closes_the_engine_stream() -> None:
    eng = ScriptedEngine(steps_for("a" * 50), delay=0.002)
    gen = Generation(eng, request(), model_name="m")
    events = gen.run()
    first = await anext(events)
    assert isinstance(first, Delta)
    await events.aclose()  # what an RPC cancellation does
    assert eng.closed
    assert gen.finished is not None and gen.finished.message == "rpc cancelled"


async def test_cancel_before_start_never_runs_the_engine() -> None:
    eng = ScriptedEngine(steps_for("abc"))
    gen = Generation(eng, request(), model_name="m")
    gen.cancel("early")
    deltas, fin = await run(gen)
    assert deltas == [] and fin.reason is Finish.CANCELLED and fin.message == "early"
    assert eng.calls == 0


@pytest.mark.parametrize("k", [0, 1, 2, 5, 8])
async def test_resumed_text_continues_exactly(k: int) -> None:
    text = "añb€c😀d"
    data = list(text.encode())
    head = ScriptedEngine([EngineStep(data[:k], [1.0] * k, finish=Finish.LENGTH)] if k else [])
    head_text = ""
    if k:
        deltas, _ = await run(Generation(head, request(max_new=k), model_name="m"))
        head_text = "".join(d.text for d in deltas)
    tail = ScriptedEngine([EngineStep(data[k:], [2.0] * (len(data) - k), finish=Finish.LENGTH)])
    deltas, _ = await run(Generation(tail, request(cont=data[:k]), model_name="m"))
    assert head_text + "".join(d.text for d in deltas) == text


def test_the_core_does_not_depend_on_grpc() -> None:
    import ast
    from pathlib import Path

    import model_server.generation as g

    tree = ast.parse(Path(g.__file__).read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert not {m for m in imported if m and (m.startswith("grpc") or "_pb2" in m)}


# -- natural batching: a step merges what the engine produced while the writer was busy ------


def lp(token_id: int) -> TokenLogprobs:
    return TokenLogprobs(token_id=token_id, logprob=-token_id / 100)


async def test_a_merged_step_is_one_delta_with_aligned_logprobs() -> None:
    ids = list(b"abcdef")
    steps = [
        EngineStep(ids[:1], [100.0], [lp(ids[0])]),
        EngineStep(ids[1:], [101.0] * 5, [lp(t) for t in ids[1:]], finish=Finish.LENGTH),
    ]
    deltas, fin = await run(Generation(ScriptedEngine(steps), request(), model_name="m"))
    assert [(d.seq, d.text, d.token_ids) for d in deltas] == [
        (1, "a", [97]),
        (2, "bcdef", [98, 99, 100, 101, 102]),
    ]
    assert [[x.token_id for x in d.logprobs or []] for d in deltas] == [[97], ids[1:]]
    assert fin.last_seq == 2 and fin.completion_tokens == 6


async def test_a_stop_string_inside_a_merged_step_cuts_ids_and_logprobs_together() -> None:
    ids = list(b"xy STOP zz")
    steps = [EngineStep(ids, [100.0] * len(ids), [lp(t) for t in ids], finish=Finish.LENGTH)]
    eng = ScriptedEngine(steps)
    deltas, fin = await run(Generation(eng, request(stop=("STOP",)), model_name="m"))
    assert len(deltas) == 1 and deltas[0].text == "xy "
    assert deltas[0].token_ids == list(b"xy STOP")
    assert [x.token_id for x in deltas[0].logprobs or []] == list(b"xy STOP")
    assert fin.reason is Finish.STOP and fin.last_seq == 1 and eng.aborted == ["r#1"]


async def test_text_held_for_a_stop_string_leaves_with_the_last_tokens() -> None:
    # "ab" then "cS" with stop "ST": "S" is held back; the engine ends in the same step, so the
    # held "S" is generated text and goes out in that step's delta, not in a message of its own.
    steps = [
        EngineStep(list(b"ab"), [100.0, 100.0]),
        EngineStep(list(b"cS"), [101.0, 101.0], finish=Finish.LENGTH),
    ]
    deltas, fin = await run(
        Generation(ScriptedEngine(steps), request(stop=("ST",)), model_name="m")
    )
    assert [(d.seq, d.text, d.token_ids) for d in deltas] == [
        (1, "ab", list(b"ab")),
        (2, "cS", list(b"cS")),
    ]
    assert fin.reason is Finish.LENGTH and fin.last_seq == 2


async def test_utf8_split_across_and_inside_merged_steps() -> None:
    data = list("é€😀".encode())  # 2 + 3 + 4 bytes
    steps = [
        EngineStep(data[:1], [100.0]),  # half of é: no text yet, the token still goes out
        EngineStep(data[1:6], [101.0] * 5),  # rest of é, € whole, first byte of 😀
        EngineStep(data[6:], [102.0] * 3, finish=Finish.LENGTH),
    ]
    deltas, _ = await run(Generation(ScriptedEngine(steps), request(), model_name="m"))
    assert [(d.text, len(d.token_ids)) for d in deltas] == [("", 1), ("é€", 5), ("😀", 3)]


async def test_after_a_cancel_a_merged_step_streams_nothing() -> None:
    # The engine produced tokens before it saw the abort and they were merged with its
    # CANCELLED finish: none of them reaches the writer after the cancel.
    steps = [
        EngineStep(list(b"ab"), [100.0, 100.0]),
        EngineStep(list(b"cd"), [101.0, 101.0], finish=Finish.CANCELLED),
    ]
    gen = Generation(ScriptedEngine(steps), request(), model_name="m")
    deltas: list[Delta] = []
    fin: Finished | None = None
    async for ev in gen.run():
        if isinstance(ev, Delta):
            deltas.append(ev)
            gen.cancel("client")
        else:
            fin = ev
    assert [d.text for d in deltas] == ["ab"]
    assert fin is not None and fin.reason is Finish.CANCELLED and fin.message == "client"
    assert fin.completion_tokens == 2 and fin.last_seq == 1
