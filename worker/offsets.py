"""Offset bookkeeping: commit only the contiguous prefix of finished records per partition.

A worker runs many prompts of one partition at once and they finish in any order. Kafka
stores one committed offset per partition ("everything before this is done"), so the offset
to commit is one past the last record of the longest run of finished records at the head of
the partition. A record still running (or abandoned at shutdown) holds the commit back, so a
worker that dies leaves it uncommitted and the next owner re-reads it.
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Offsets of one partition in consumption order; `done()` marks one finished."""

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._committable: int | None = None
        self._committed: int | None = None

    def add(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} is not after {self._pending[-1]}")
        if self._committable is not None and offset < self._committable:
            raise ValueError(f"offset {offset} is before the committable {self._committable}")
        self._pending.append(offset)

    def done(self, offset: int) -> None:
        """Mark a record finished (unknown or already committed offsets are ignored)."""
        if offset in self._done:
            return
        if self._committable is not None and offset < self._committable:
            return
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            head = self._pending.popleft()
            self._done.discard(head)
            self._committable = head + 1

    @property
    def in_progress(self) -> int:
        """Records added and not yet part of the committable prefix."""
        return len(self._pending)

    def to_commit(self) -> int | None:
        """The offset to commit now, or None if nothing new since `committed()`."""
        if self._committable is None or self._committable == self._committed:
            return None
        return self._committable

    def committed(self, offset: int) -> None:
        self._committed = offset

    @property
    def last_committed(self) -> int | None:
        """The offset last passed to `committed()` (None before the first commit)."""
        return self._committed
