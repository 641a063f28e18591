"""Incremental detokenization that only ever emits valid UTF-8, and stop-string matching.

Byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) can split one character across several
tokens. ``IncrementalDetokenizer`` keeps the bytes of an unfinished character until the
character is complete; bytes that can never form a character are replaced by U+FFFD, the way
``bytes.decode(errors="replace")`` does. ``StopMatcher`` holds back text that might be the
start of a stop string, so that a stop string is never streamed.

Both can be *primed* with the tokens a request continues from: the text of those tokens was
already streamed by the interrupted attempt, except what this module was still holding back,
so priming reproduces exactly the state an uninterrupted run would have had at that point.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable


class IncrementalDetokenizer:
    """Token ids -> text, holding back incomplete multi-byte sequences."""

    __slots__ = ("_decoder", "_piece")

    def __init__(self, piece: Callable[[int], bytes], prime: Iterable[int] = ()) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token_id in prime:
            self._decoder.decode(piece(token_id))

    def push(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""
        return self._decoder.decode(self._piece(token_id))

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished character held back so far."""
        return self._decoder.getstate()[0]


class StopMatcher:
    """Finds stop strings in streamed text.

    ``push`` returns the text that is safe to emit now and whether a stop string was found;
    the text before the stop string is emitted, the stop string and anything after it are not.
    """

    __slots__ = ("_held", "_max_len", "_stops", "stopped")

    def __init__(self, stops: Iterable[str], prime: str = "") -> None:
        self._stops = tuple(s for s in stops if s)
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False
        if prime:
            self.push(prime)

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        first = -1
        for stop in self._stops:
            i = buf.find(stop)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self.stopped = True
            self._held = ""
            return buf[:first]
        keep = self._holdback(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        longest = min(len(buf), self._max_len - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0

    @property
    def held(self) -> str:
        return self._held

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop on a stop string."""
        held, self._held = self._held, ""
        return held
