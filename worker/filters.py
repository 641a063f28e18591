"""Output filter hook: stops a stream whose text contains a blocked term.

The check runs over the text already emitted plus the new delta, so a term split across
deltas is caught. A delta that completes a blocked term is not emitted; the stream ends with
finish reason `content_filter` and the client keeps the text sent before it.
"""

from __future__ import annotations

from collections.abc import Iterable


class Blocklist:
    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = tuple(t.lower() for t in terms if t.strip())
        self._keep = max((len(t) for t in self.terms), default=1) - 1

    @classmethod
    def parse(cls, spec: str) -> Blocklist:
        """Comma-separated terms (case-insensitive substrings)."""
        return cls(t.strip() for t in spec.split(","))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def stream(self) -> StreamFilter:
        return StreamFilter(self)


class StreamFilter:
    """Per-request state: the tail of emitted text a blocked term could start in."""

    def __init__(self, blocklist: Blocklist) -> None:
        self._blocklist = blocklist
        self._tail = ""

    def check(self, text: str) -> str | None:
        """The blocked term that `text` completes, or None (then `text` counts as emitted)."""
        if not self._blocklist.terms:
            return None
        window = (self._tail + text).lower()
        for term in self._blocklist.terms:
            if term in window:
                return term
        keep = self._blocklist._keep
        self._tail = (self._tail + text)[-keep:] if keep else ""
        return None
