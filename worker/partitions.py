"""The worker's view of its assigned prompts partitions: one state object per partition.

Transitions of a `PartitionState` (the Kafka consumer owns the partition in between):

    (none) --assigned--> ACTIVE <--bound reached / room again--> PAUSED
    ACTIVE | PAUSED --revoked (its runs abandoned first)--> (none)

Within a partition, each fetched record is `fetched` (its offset pending), then either
`admit`ted as a run or `done` at once (cancel, repeat, dead letter). A run leaves by `finish`
(terminal event acknowledged: its offset is done) or `drop` (abandoned or unreportable: the
offset stays pending, so it is never committed and the next owner runs it again). The commit
point is the contiguous prefix of done offsets (`worker.offsets`).

`Partitions` holds the assignment and the queries across it (a request by id, the in-flight
count, pauses, commits). Synchronous and free of I/O: the shell applies what it returns.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from worker.offsets import PartitionOffsets
from worker.run import Run

# Request ids remembered after their end, so a repeated submit (or a late cancel read ahead) of
# a finished request does nothing.
RECENT_LIMIT = 65536


class Status(enum.Enum):
    ACTIVE = "active"
    PAUSED = "paused"  # at the in-flight bound: not fetched until runs end


@dataclass
class PartitionState:
    tp: TopicPartition
    # End offset at assignment: records below it may have been (partly) served by an earlier
    # owner, so they are looked up in the tokens topic before they run.
    takeover_until: int
    # The group's committed offset at assignment (None: none yet): where the cancel lookahead
    # starts reading.
    lookahead_from: int | None
    # Consumer-group generation of the assignment: later owners of the partition have a greater
    # one, so it orders the fences of its requests' events (docs/events.md).
    generation: int = 0
    status: Status = Status.ACTIVE
    offsets: PartitionOffsets = field(default_factory=PartitionOffsets)
    runs: dict[str, Run] = field(default_factory=dict)  # in flight, by request id
    # Monotonic time at which the cancel lookahead last stood at the partition's end.
    lookahead_synced_at: float = 0.0

    def fetched(self, offset: int) -> None:
        """A record was fetched: its offset is pending until `done` (or `Partitions.finish`)."""
        self.offsets.add(offset)

    def done(self, offset: int) -> None:
        """A fetched record needs no (more) work."""
        self.offsets.done(offset)

    def needs_lookup(self, offset: int) -> bool:
        return offset < self.takeover_until

    def lag(self, high_watermark: int) -> int:
        """Records not committed yet (queued, running, or finished behind a running one)."""
        done = self.offsets.last_committed
        if done is None:
            done = self.lookahead_from
        return max(0, high_watermark - (done or 0))


class Partitions:
    def __init__(self) -> None:
        self.states: dict[TopicPartition, PartitionState] = {}
        # Requests in flight over every partition: a plain int, read by the metrics thread.
        self.inflight = 0
        self._recent: OrderedDict[str, None] = OrderedDict()

    # -------------------------------------------------------------- assignment

    def assign(
        self, tp: TopicPartition, end_offset: int, committed: int | None, generation: int = 0
    ) -> None:
        self.states[tp] = PartitionState(tp, end_offset, committed, generation=generation)

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a partition (the caller abandons its runs first; any left are forgotten)."""
        state = self.states.pop(tp, None)
        if state is not None:
            self.inflight -= len(state.runs)

    def get(self, tp: TopicPartition) -> PartitionState | None:
        return self.states.get(tp)

    # -------------------------------------------------------------- requests

    def run_of(self, request_id: str) -> Run | None:
        for state in self.states.values():
            run = state.runs.get(request_id)
            if run is not None:
                return run
        return None

    def runs(self, tps: Iterable[TopicPartition] | None = None) -> list[Run]:
        """Runs in flight (of `tps` only, if given)."""
        wanted = self.states.keys() if tps is None else set(tps)
        return [r for tp, s in self.states.items() if tp in wanted for r in s.runs.values()]

    def ended_recently(self, request_id: str) -> bool:
        return request_id in self._recent

    def known(self, request_id: str) -> bool:
        """Running or recently ended: a repeated submit of it has nothing to do."""
        return self.ended_recently(request_id) or self.run_of(request_id) is not None

    def admit(self, run: Run) -> None:
        state = self.states[run.tp]
        state.runs[run.request_id] = run
        self.inflight += 1

    def current(self, run: Run) -> bool:
        """The run is still this worker's (not dropped, its partition not revoked)."""
        state = self.states.get(run.tp)
        return state is not None and state.runs.get(run.request_id) is run

    def finish(self, run: Run) -> None:
        """The run's terminal event is acknowledged (or it had nothing to do): its offset is
        done."""
        self._recent[run.request_id] = None
        if len(self._recent) > RECENT_LIMIT:
            self._recent.popitem(last=False)
        if self.current(run):
            self.states[run.tp].done(run.offset)
            self._remove(run)

    def drop(self, run: Run) -> None:
        """The run leaves without a terminal event: its offset stays pending."""
        if self.current(run):
            self._remove(run)

    def _remove(self, run: Run) -> None:
        del self.states[run.tp].runs[run.request_id]
        self.inflight -= 1

    # -------------------------------------------------------------- pausing

    def pause_changes(
        self, max_inflight: int, assigned: Iterable[TopicPartition]
    ) -> tuple[list[TopicPartition], list[TopicPartition]]:
        """Partitions to pause (at the bound) and to resume (room again); the states move to
        match, the caller tells the consumer."""
        full = self.inflight >= max_inflight
        to_pause: list[TopicPartition] = []
        to_resume: list[TopicPartition] = []
        for tp in assigned:
            state = self.states.get(tp)
            if state is None:
                continue
            if full and state.status is Status.ACTIVE:
                state.status = Status.PAUSED
                to_pause.append(tp)
            elif not full and state.status is Status.PAUSED:
                state.status = Status.ACTIVE
                to_resume.append(tp)
        return to_pause, to_resume

    def room(self, max_inflight: int) -> int:
        """Records one fetch may bring: never more than the bound allows (at least 1, the
        consumer's minimum; paused partitions bring none)."""
        return max(1, max_inflight - self.inflight)

    # -------------------------------------------------------------- commits

    def to_commit(self, assigned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        todo = {}
        for tp in assigned:
            state = self.states.get(tp)
            offset = state.offsets.to_commit() if state is not None else None
            if offset is not None:
                todo[tp] = offset
        return todo

    def commit_point(self, assigned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """What is committed already, or would be now, per partition: committing it again
        changes nothing but proves the group still counts this worker in (`ProduceGate`). A
        partition without any commit yet offers the start of the log (0: nothing consumed)."""
        out = {}
        for tp in assigned:
            state = self.states.get(tp)
            if state is None:
                continue
            offsets = state.offsets
            point = offsets.to_commit() or offsets.last_committed or state.lookahead_from
            out[tp] = point or 0
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self.states.get(tp)
            if state is not None:
                state.offsets.committed(offset)
