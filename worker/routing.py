"""Model server choice: prefix affinity with bounded load, else the least in-flight replica;
cooldown after failures; backoff with jitter.

**Prefix affinity** (docs/scheduling.md): requests whose prompts start alike go to the same
replica, so an engine with a prefix cache (vLLM's automatic prefix caching) computes the shared
prefix once instead of once per replica. The key is a hash of the model and the prompt's
prefix (`prefix_key`); replicas sit on a hash ring (`RING_POINTS` points each, so keys spread
evenly and a replica joining or leaving moves only its share). A request goes to the first
replica clockwise from its key whose load is under the cap `ceil(LOAD_FACTOR x (load + 1) / n)`
(consistent hashing with bounded loads, Mirrokni et al. 2018): a hot prefix fills its replica
up to 25 % above the average, then spills to the next replica on the ring, which then caches it
too. Failover is unchanged: cooling-down and excluded replicas are not candidates.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterable

from llmstream.v1 import common_pb2

# Characters (or token ids) of the prompt that make its affinity key. 512 characters are about
# 128 tokens, 8 of vLLM's 16-token KV blocks: a prefix worth reusing. Prompts that differ only
# after it share a replica, which costs nothing when they share no cache.
PREFIX_CHARS = 512
PREFIX_TOKEN_IDS = 128
# A replica may take this much more than the average load before a key spills past it.
LOAD_FACTOR = 1.25
RING_POINTS = 64


def prefix_key(model: str, prompt: common_pb2.Prompt) -> str:
    """The part of a prompt that requests sharing a KV cache have in common.

    Chat: the leading system message(s), the prompt every request of an application repeats
    (the worker cannot render the chat template, but the template puts them first); without
    one, the first user turn (the start of every later turn of the same conversation). Text:
    its first `PREFIX_CHARS` characters. Tokens: the first `PREFIX_TOKEN_IDS` ids.
    """
    kind = prompt.WhichOneof("kind")
    if kind == "chat":
        messages = prompt.chat.messages
        system = [m.content for m in messages if m.role == "system"]
        leading = system or [m.content for m in messages[:1]]
        head = "\x00".join(leading)[:PREFIX_CHARS]
    elif kind == "tokens":
        head = ",".join(str(i) for i in prompt.tokens.ids[:PREFIX_TOKEN_IDS])
    else:
        head = prompt.text[:PREFIX_CHARS]
    return f"{model}\x00{kind}\x00{head}"


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Router:
    """Chooses a replica per request attempt: by prefix affinity under a load cap, or by
    fewest requests in flight from this worker (loads are this worker's own).

    A replica that failed (UNAVAILABLE) is avoided for `cooldown_s` unless every replica is
    cooling down; `exclude` lets a retry prefer a different replica than the one that failed.
    """

    def __init__(self, replicas: Iterable[str], cooldown_s: float = 2.0) -> None:
        self.replicas = list(dict.fromkeys(replicas))
        if not self.replicas:
            raise ValueError("no model server replicas configured")
        self.cooldown_s = cooldown_s
        self.inflight: dict[str, int] = {r: 0 for r in self.replicas}
        self._failed_until: dict[str, float] = {}
        self._next = 0  # round-robin among ties
        ring = sorted((_hash(f"{r}#{i}"), r) for r in self.replicas for i in range(RING_POINTS))
        self._ring_hashes = [h for h, _ in ring]
        self._ring = [r for _, r in ring]

    def pick(self, now: float, exclude: Iterable[str] = (), key: str | None = None) -> str:
        """The replica for the next attempt: by `key` (a `prefix_key`) under the load cap if
        given, else the least loaded."""
        excluded = set(exclude)
        healthy = [r for r in self.replicas if self._failed_until.get(r, 0.0) <= now]
        candidates = [r for r in healthy if r not in excluded] or healthy
        if not candidates:
            candidates = [r for r in self.replicas if r not in excluded] or self.replicas
        if key is not None:
            return self._ring_owner(key, candidates)
        least = min(self.inflight[r] for r in candidates)
        ties = [r for r in candidates if self.inflight[r] == least]
        self._next += 1
        return ties[self._next % len(ties)]

    def _ring_owner(self, key: str, candidates: list[str]) -> str:
        """First candidate clockwise from the key's point whose load is under the cap (there is
        always one: the least loaded candidate is at or below the average, under the cap)."""
        allowed = set(candidates)
        load = sum(self.inflight[r] for r in candidates)
        cap = math.ceil(LOAD_FACTOR * (load + 1) / len(candidates))
        start = bisect.bisect(self._ring_hashes, _hash(key))
        seen: set[str] = set()
        for i in range(len(self._ring)):
            replica = self._ring[(start + i) % len(self._ring)]
            if replica in seen or replica not in allowed:
                continue
            if self.inflight[replica] < cap:
                return replica
            seen.add(replica)
        raise AssertionError(f"no replica under the load cap {cap}: {self.inflight}")

    def acquire(self, replica: str) -> None:
        self.inflight[replica] += 1

    def release(self, replica: str) -> None:
        self.inflight[replica] -= 1

    def failed(self, replica: str, now: float) -> None:
        self._failed_until[replica] = now + self.cooldown_s

    def succeeded(self, replica: str) -> None:
        self._failed_until.pop(replica, None)


def backoff_s(retry: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `retry` (1, 2, ...): exponential, capped, "equal jitter"
    (half fixed, half random) so synchronized workers spread out but never retry at once."""
    if retry < 1:
        raise ValueError("retry counts from 1")
    ceiling = float(min(cap_s, base_s * 2.0 ** (retry - 1)))
    r: float = (rng or random).random()
    return ceiling / 2 + r * ceiling / 2
