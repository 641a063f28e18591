"""Coalescing of one request's model deltas into token events.

When the model produces tokens faster than Kafka acknowledges records, the worker merges
consecutive deltas of a request into one `token_delta` event. Policy (pure, clock passed in):

- a delta arriving while the request's previous event is acknowledged is sent at once
  (idle pipeline: no added latency);
- otherwise it waits in the buffer until the previous event is acknowledged, the oldest
  buffered delta is `max_delay_s` old, or the buffer holds `max_bytes` of text — whichever
  comes first. `max_delay_s=inf`: only the acknowledgement or the size (natural batching;
  the emitter then arms no timer).

Every token id and every character goes into exactly one event, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Pending:
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    nbytes: int = 0
    first_at: float | None = None
    deltas: int = 0


class Coalescer:
    def __init__(self, max_delay_s: float, max_bytes: int) -> None:
        if max_delay_s < 0 or max_bytes < 1:
            raise ValueError("max_delay_s must be >= 0 and max_bytes >= 1")
        self.max_delay_s = max_delay_s
        self.max_bytes = max_bytes
        self._buf = Pending()

    def add(self, text: str, token_ids: list[int], now: float) -> None:
        buf = self._buf
        if buf.first_at is None:
            buf.first_at = now
        buf.text_parts.append(text)
        buf.token_ids.extend(token_ids)
        buf.nbytes += len(text.encode())
        buf.deltas += 1

    @property
    def pending_tokens(self) -> int:
        return len(self._buf.token_ids)

    @property
    def empty(self) -> bool:
        return self._buf.deltas == 0

    def due(self, now: float, previous_acked: bool) -> bool:
        """True if the buffer should become an event now."""
        buf = self._buf
        if buf.deltas == 0:
            return False
        if previous_acked or buf.nbytes >= self.max_bytes:
            return True
        assert buf.first_at is not None
        return now - buf.first_at >= self.max_delay_s

    def deadline(self) -> float | None:
        """When the buffer is due at the latest (None when empty)."""
        if self._buf.first_at is None:
            return None
        return self._buf.first_at + self.max_delay_s

    def take(self) -> tuple[str, list[int], int]:
        """Text, token ids and number of model deltas merged; empties the buffer."""
        buf = self._buf
        self._buf = Pending()
        return "".join(buf.text_parts), buf.token_ids, buf.deltas
