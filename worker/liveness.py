"""Fast takeover: a dead worker leaves the consumer group within milliseconds, not after its
session timeout (docs/worker.md, "Fast takeover").

A worker killed with `kill -9` stays a member of the group until the session timeout (10 s)
expires, and its requests stall that long. But the kernel closes its sockets at once: every
model server it watched (`WatchWorkers`, one stream per replica) sees the stream break and
tells the other workers of the group (the dead worker's presence: its group member id).
They evict that member (`LeaveGroup` on its behalf, what the member itself sends when it stops)
and rejoin at once: the group rebalances now, and the new owners continue the requests through
the ordinary takeover (a new group generation, so the usual fences; nothing here writes an
event or decides who owns a partition — the group still does).

- `Evictions` (pure): whom to evict — not this worker, not another group, each member once.
- `PeerWatch`: the `WatchWorkers` streams (one per replica, reconnecting with backoff); says
  who this worker is (`set_membership` after every assignment) and says goodbye (`leave`:
  `leaving`) before it stops, so a worker that leaves on purpose is not reported.
- `GroupEvictor`: sends the `LeaveGroup` for a lost member and requests this member's rejoin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kafka_errors
from aiokafka.protocol.group import LeaveGroupRequest

from llmstream import kafka, telemetry
from llmstream.v1 import model_service_pb2
from worker.models import ModelServers

log = logging.getLogger("worker")

RECENT_EVICTIONS = 1024  # member ids remembered, so the notices of N replicas evict once
WATCH_BACKOFF_S = (0.2, 5.0)  # reconnect delay of a broken watch: first, cap (doubling)
GOODBYE_TIMEOUT_S = 1.0  # how long a stopping worker waits for each replica to end its watch


class Evictions:
    def __init__(self, group: str) -> None:
        self.group = group
        self._recent: OrderedDict[str, None] = OrderedDict()

    def wanted(self, lost: model_service_pb2.WorkerPresence, own_member_id: str) -> bool:
        """Evict this lost member? Once per member id, never this worker itself (a notice about
        an earlier membership of this process names an id it no longer has: evicting that is a
        no-op the broker answers UNKNOWN_MEMBER_ID), only members of this worker's group."""
        member = lost.member_id
        if not member or lost.group != self.group or member == own_member_id:
            return False
        if member in self._recent:
            return False
        self._recent[member] = None
        if len(self._recent) > RECENT_EVICTIONS:
            self._recent.popitem(last=False)
        return True


class PeerWatch:
    def __init__(
        self,
        models: ModelServers,
        replicas: list[str],
        worker_id: str,
        group: str,
        on_lost: Callable[[model_service_pb2.WorkerPresence], None],
        on_broken: Callable[[str], None],
    ) -> None:
        self._models = models
        self._replicas = replicas
        self._on_lost = on_lost
        self._on_broken = on_broken
        self.presence = model_service_pb2.WorkerPresence(worker_id=worker_id, group=group)
        self.leaving = False
        # Set (and replaced) at every change: each stream's writer sends the new presence.
        self._changed = asyncio.Event()
        # One per established stream, set when it has ended: what `leave` waits for.
        self._open: dict[str, asyncio.Event] = {}

    def set_membership(self, member_id: str, generation: int) -> None:
        """After every assignment: the member id and generation other workers would evict."""
        self.presence = model_service_pb2.WorkerPresence(
            worker_id=self.presence.worker_id,
            group=self.presence.group,
            member_id=member_id,
            generation=generation,
        )
        self._changed_now()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def leave(self) -> None:
        """Before this worker leaves the group on purpose: a last message with `leaving` on
        every stream, and the servers' end of them (each waited for up to GOODBYE_TIMEOUT_S).
        Best effort: a replica that misses it reports this worker lost, and evicting a member
        that has left is a no-op. (Cancelling the watch instead would cancel its RPCs: grpc
        cancels a call whose pending read is cancelled, and the servers would see a death.)"""
        self.leaving = True
        self._changed_now()
        ended = [asyncio.ensure_future(e.wait()) for e in self._open.values()]
        if ended:
            try:
                await asyncio.wait(ended, timeout=GOODBYE_TIMEOUT_S)
            finally:
                for waiter in ended:
                    waiter.cancel()

    async def run(self) -> None:
        """Watches every replica until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            for replica in self._replicas:
                tasks.create_task(self._watch_forever(replica), name=f"watch {replica}")

    async def _watch_forever(self, replica: str) -> None:
        delay = WATCH_BACKOFF_S[0]
        while not self.leaving:
            established = await self._watch(replica)
            if self.leaving:
                break
            if established:
                # The server may have reported this worker lost (a broken link looks like a
                # dead process to it): the caller pauses producing until the group confirms.
                self._on_broken(replica)
                delay = WATCH_BACKOFF_S[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_BACKOFF_S[1])
        await asyncio.Event().wait()  # left: nothing more to watch until the worker stops

    async def _watch(self, replica: str) -> bool:
        """One stream until it ends; True if it had been established (the server answered
        with its headers)."""
        call = self._models.stub(replica).WatchWorkers()
        ended = asyncio.Event()
        writer: asyncio.Task[None] | None = None
        try:
            await call.wait_for_connection()
            self._open[replica] = ended
            writer = asyncio.create_task(self._write_presence(call))
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return True
                self._on_lost(msg.lost)
        except grpc.aio.AioRpcError as exc:
            log.debug(
                "worker watch ended",
                extra=telemetry.fields(replica=replica, code=exc.code().name),
            )
            return replica in self._open
        finally:
            ended.set()
            self._open.pop(replica, None)
            if writer is not None:
                writer.cancel()
            call.cancel()

    async def _write_presence(self, call: Any) -> None:
        """Sends the presence now and after each change; after a `leaving` one, half-closes."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):  # the call ended
            while True:
                changed = self._changed
                leaving = self.leaving
                await call.write(
                    model_service_pb2.WatchWorkersRequest(presence=self.presence, leaving=leaving)
                )
                if leaving:
                    await call.done_writing()
                    return
                await changed.wait()


class GroupEvictor:
    """Evicts lost members of this worker's group. Uses the consumer's coordinator connection
    (aiokafka has no public call for it; `KafkaClients.generation` reads its state likewise)."""

    def __init__(self, consumer: AIOKafkaConsumer, group: str) -> None:
        self._consumer = consumer
        self.evictions = Evictions(group)
        self.evicted = 0

    def own_member_id(self) -> str:
        return str(self._consumer._coordinator.member_id)

    async def evict(self, lost: model_service_pb2.WorkerPresence) -> None:
        if not self.evictions.wanted(lost, self.own_member_id()):
            return
        coordinator = self._consumer._coordinator
        request = LeaveGroupRequest(self.evictions.group, lost.member_id)
        fields = telemetry.fields(
            lost_worker=lost.worker_id, lost_member=lost.member_id, generation=lost.generation
        )
        try:
            response = await asyncio.wait_for(coordinator._send_req(request), kafka.CALL_TIMEOUT_S)
        except (kafka_errors.KafkaError, TimeoutError) as exc:
            # The session timeout still removes it; nothing is lost but time.
            log.warning("evicting a lost worker failed: %r", exc, extra=fields)
            return
        error = kafka_errors.for_code(response.error_code)
        if error is kafka_errors.NoError:
            self.evicted += 1
            log.info("lost worker evicted from the group: rebalancing now", extra=fields)
            # Rejoin at once rather than at the next heartbeat: the rebalance waits for us.
            coordinator.request_rejoin()
        elif error is kafka_errors.UnknownMemberIdError:
            # Another worker evicted it first (its rebalance reaches us by heartbeat), or it
            # had left already.
            log.info("lost worker already out of the group", extra=fields)
        else:
            log.warning("evicting a lost worker refused: %s", error.__name__, extra=fields)
