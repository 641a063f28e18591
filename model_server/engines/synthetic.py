"""Synthetic engine: deterministic pseudo-text at a configurable pace. NOT a model.

It exists for load tests and pipeline benchmarks, where a real model would measure the model
instead of the plumbing. Properties:

- Token ``i`` of a completion is a pure function of (prompt ids, seed, i, token i-1), so a
  continuation from logged tokens equals the uninterrupted run, like a greedy model. Greedy
  requests (temperature 0) use seed 0; sampled requests without a seed draw a random one, as
  a real model would behave.
- Pace: the sequence is scheduled on one of ``slots`` slots (fair queue, as llama.cpp); its
  first new token is due ``ttft_ms`` (+ ``prefill_us_per_token`` per prompt token) after
  scheduling, then one every ``itl_ms``. Deadlines are absolute, so a slow reader gets the
  tokens that became due in one merged step instead of slowing the engine down. With
  ``itl_ms == 0`` tokens come as fast as the event loop runs the sequence (one per loop
  iteration, produced by a task of its own, like a real engine's decode thread): a reader
  that takes longer than that (a gRPC write in flight) gets every token produced meanwhile
  in one merged step (``StepChannel``; the producer runs at most ``max_step_tokens`` ahead),
  one that keeps up gets one token per step. Used to measure overhead.
- Vocabulary: ids 0-255 are single bytes, 256-258 special tokens (256 is end-of-sequence,
  never generated), then whole words. Text prompts tokenize to one token per UTF-8 byte.
  The generator regularly emits multi-byte characters byte by byte (é, ü, €, 😀) so that
  clients see how UTF-8 split across tokens is held back.
- Fault injection for tests: if ``fail_marker`` is set and occurs in the prompt, the engine
  raises ``EngineError`` after ``fail_after`` tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any, ClassVar

from model_server.engine import EngineInfo, Sequence, SlotEngine, StepChannel
from model_server.errors import EngineError
from model_server.rng import mix
from model_server.types import (
    EngineStep,
    Finish,
    ModelLimits,
    PromptInput,
    TokenLogprobs,
)

EOS = 256
IM_START = 257
IM_END = 258
_SPECIAL = {EOS: b"", IM_START: b"", IM_END: b""}

_WORDS = [
    "",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "stream",
    "token",
    "model",
    "server",
    "river",
    "light",
    "stone",
    "garden",
    "window",
    "morning",
    "letter",
    "music",
    "story",
    "mountain",
    "quiet",
    "bright",
    "green",
    "small",
    "early",
][1:]
_PUNCT = (".", ",", "\n")
_WORD_TOKENS: tuple[bytes, ...] = tuple(
    [(" " + w).encode() for w in _WORDS] + [p.encode() for p in _PUNCT]
)
FIRST_WORD = 259
VOCAB_SIZE = FIRST_WORD + len(_WORD_TOKENS)

# Multi-byte characters emitted byte by byte. Each continuation byte below is used by one
# character only, so the next byte follows from the previous token alone.
_CHARS = ("é", "ü", "€", "😀")
_NEXT_BYTE: dict[int, tuple[int, ...]] = {0xC3: (0xA9, 0xBC), 0xE2: (0x82,), 0x82: (0xAC,)}
_NEXT_BYTE.update({0xF0: (0x9F,), 0x9F: (0x98,), 0x98: (0x80,)})
_LEADS = (0xC3, 0xC3, 0xE2, 0xF0)

_CHAT_ROLE_PREFIX = b"\n"


def token_bytes(token_id: int) -> bytes:
    if token_id < 256:
        return bytes((token_id,))
    if token_id < FIRST_WORD:
        return _SPECIAL[token_id]
    return _WORD_TOKENS[token_id - FIRST_WORD]


def prompt_digest(prompt_ids: list[int]) -> int:
    return (
        mix(len(prompt_ids), *prompt_ids)
        if len(prompt_ids) < 4096
        else mix(len(prompt_ids), hash(tuple(prompt_ids)))
    )


def next_token(digest: int, seed: int, position: int, prev: int) -> int:
    """Token at completion position ``position`` given the previous token (-1: none)."""
    forced = _NEXT_BYTE.get(prev)
    h = mix(digest, seed, position, prev)
    if forced is not None:
        return forced[h % len(forced)]
    r = h % 64
    if r < 3:
        return _LEADS[(h >> 8) % len(_LEADS)]
    return FIRST_WORD + (h >> 8) % len(_WORD_TOKENS)


class SyntheticEngine(SlotEngine):
    kind: ClassVar[str] = "synthetic"

    def __init__(self, options: Mapping[str, Any], limits: ModelLimits) -> None:
        slots = int(options.get("slots", limits.max_concurrency))
        super().__init__(options, limits, slots=slots)
        self.ttft_s = float(options.get("ttft_ms", 20.0)) / 1000.0
        self.itl_s = float(options.get("itl_ms", 10.0)) / 1000.0
        self.prefill_s_per_token = float(options.get("prefill_us_per_token", 0.0)) / 1e6
        self.max_step_tokens = int(options.get("max_step_tokens", 64))
        marker = options.get("fail_marker")
        self.fail_marker = str(marker).encode() if marker else None
        self.fail_after = int(options.get("fail_after", 0))

    async def load(self) -> None:
        self._info = EngineInfo(
            vocab_size=VOCAB_SIZE,
            eos_token_ids=frozenset({EOS}),
            max_context=self.limits.max_context,
            version=str(self.options.get("version", "synthetic-1")),
        )

    async def close(self) -> None:
        for rid in list(self._seqs):
            await self.abort(rid)

    async def tokenize(self, prompt: PromptInput) -> list[int]:
        if prompt.text is not None:
            return list(prompt.text.encode())
        ids: list[int] = []
        for turn in prompt.chat or ():
            ids.append(IM_START)
            ids.extend(turn.role.encode() + _CHAT_ROLE_PREFIX + turn.content.encode())
            ids.append(IM_END)
            ids.append(ord("\n"))
        ids.append(IM_START)
        ids.extend(b"assistant\n")
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return token_bytes(token_id)

    def _fails(self, prompt_ids: list[int]) -> bool:
        if self.fail_marker is None:
            return False
        return self.fail_marker in bytes(t for t in prompt_ids if t < 256)

    async def _run(self, seq: Sequence, slot: int) -> AsyncGenerator[EngineStep, None]:
        try:
            steps = self._produce(seq) if self.itl_s > 0 else self._produce_ahead(seq)
            async with contextlib.aclosing(steps):
                async for step in steps:
                    yield step
        finally:
            self._scheduler.release(slot)

    async def _produce_ahead(self, seq: Sequence) -> AsyncGenerator[EngineStep, None]:
        """Zero delay: a task produces the tokens whether or not they are read; each read
        takes everything produced since the previous one, merged (at most `max_step_tokens`:
        the producer waits for the reader beyond that, so a step stays bounded)."""
        ahead = _Ahead(StepChannel(asyncio.get_running_loop()))
        producer = asyncio.ensure_future(self._produce_into(seq, ahead))
        try:
            while True:
                step = await ahead.channel.get()
                ahead.taken()
                if step.finish is Finish.ERROR:
                    if step.token_ids:  # produced before the failure: they were generated
                        step.finish = None
                        yield step
                    assert ahead.failure is not None
                    raise ahead.failure
                yield step
                if step.finish is not None:
                    return
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _produce_into(self, seq: Sequence, ahead: _Ahead) -> None:
        try:
            async with contextlib.aclosing(self._produce(seq)) as steps:
                async for step in steps:
                    ahead.channel.put(step)
                    ahead.unread += len(step.token_ids)
                    while ahead.unread >= self.max_step_tokens:
                        ahead.drained.clear()
                        await ahead.drained.wait()
        except Exception as exc:  # the reader raises it, after the tokens produced before
            ahead.failure = exc
            ahead.channel.put(EngineStep([], [], finish=Finish.ERROR, message=str(exc)))

    async def _produce(self, seq: Sequence) -> AsyncGenerator[EngineStep, None]:
        req = seq.req
        sampling = req.sampling
        if sampling.greedy:
            seed = 0
        elif sampling.seed is not None:
            seed = sampling.seed
        else:
            seed = random.getrandbits(64)
        digest = prompt_digest(req.prompt_token_ids)
        position = len(req.continuation_token_ids)
        prev = req.continuation_token_ids[-1] if req.continuation_token_ids else -1
        fail_at = self.fail_after if self._fails(req.prompt_token_ids) else -1
        start = req.scheduled_at or time.monotonic()
        context_tokens = len(req.prompt_token_ids) + position
        first_due = start + self.ttft_s + self.prefill_s_per_token * context_tokens
        produced = 0
        total = req.max_new_tokens
        while produced < total:
            if seq.aborted.is_set():
                yield EngineStep([], [], finish=Finish.CANCELLED, finished_at=time.monotonic())
                return
            if produced == fail_at:
                raise EngineError(f"synthetic fault injected after {produced} tokens")
            due = first_due + produced * self.itl_s
            now = time.monotonic()
            if due > now:
                await self._sleep(seq, due - now)
                continue
            if self.itl_s > 0:
                n = 1 + int((now - due) / self.itl_s)
                n = min(n, total - produced, self.max_step_tokens)
            else:
                n = 1
            if fail_at >= 0:
                n = min(n, fail_at - produced) or 1
            ids: list[int] = []
            for _ in range(n):
                prev = next_token(digest, seed, position, prev)
                ids.append(prev)
                position += 1
            produced += n
            self.tokens_produced += n
            seq.produced += n
            now = time.monotonic()
            step = EngineStep(ids, [now] * n)
            if sampling.logprobs:
                step.logprobs = [_fake_logprobs(t, sampling.logprobs) for t in ids]
            if produced >= total:
                step.finish = Finish.LENGTH
                step.finished_at = now
            yield step
            if self.itl_s <= 0:
                # One token per loop iteration: other sequences and the readers run between.
                await asyncio.sleep(0)

    async def _sleep(self, seq: Sequence, delay: float) -> None:
        waiter = seq.abort_waiter
        if waiter is None or waiter.done():
            return
        await asyncio.wait((waiter,), timeout=delay)


class _Ahead:
    """What the zero-delay producer and its reader share."""

    __slots__ = ("channel", "drained", "failure", "unread")

    def __init__(self, channel: StepChannel) -> None:
        self.channel = channel
        self.unread = 0  # tokens put and not yet taken
        self.drained = asyncio.Event()
        self.failure: Exception | None = None

    def taken(self) -> None:
        self.unread = 0
        self.drained.set()


def _fake_logprobs(token_id: int, top_n: int) -> TokenLogprobs:
    lp = -((mix(token_id) % 4000) / 1000.0)
    top = tuple((FIRST_WORD + i, lp + 0.1 * (top_n - i)) for i in range(top_n))
    return TokenLogprobs(token_id=token_id, logprob=lp, top=top)
