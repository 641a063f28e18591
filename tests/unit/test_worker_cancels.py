"""The cancel lookahead following the worker's assignment while a rebalance changes it."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition

from worker.cancels import CancelLookahead
from worker.metrics import WorkerMetrics
from worker.partitions import Partitions

TOPIC = "prompts"


class RevokingReader:
    """A group-less reader whose first `seek_to_beginning` lets a rebalance revoke a partition
    not sought yet (what happens while the real one awaits the broker)."""

    def __init__(self, partitions: Partitions) -> None:
        self.partitions = partitions
        self.revoked: TopicPartition | None = None
        self.assigned: list[TopicPartition] = []
        self.positions: dict[TopicPartition, Any] = {}

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = sorted(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.positions[tp] = "beginning"
        if self.revoked is None:
            self.revoked = next(t for t in self.assigned if t not in self.positions)
            self.partitions.revoke(self.revoked)


async def test_a_partition_revoked_during_the_seeks_is_followed_next_round() -> None:
    partitions = Partitions()
    tps = [TopicPartition(TOPIC, p) for p in range(4)]
    for tp in tps:
        partitions.assign(tp, end_offset=0, committed=None)  # no commit yet: from the start
    reader = RevokingReader(partitions)
    lookahead = CancelLookahead(
        reader,
        partitions,
        lambda request_id, reason: None,
        WorkerMetrics(lambda: 0),
    )
    await lookahead._follow_assignment()  # the first seek revokes another one: no KeyError
    assert reader.positions == {tp: "beginning" for tp in tps}
    await lookahead._follow_assignment()
    assert reader.assigned == [tp for tp in tps if tp != reader.revoked]
