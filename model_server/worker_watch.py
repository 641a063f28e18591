"""Which workers watch this server, and who is told when one of them dies (`WatchWorkers`).

A worker killed with `kill -9` keeps its consumer-group membership until the group's session
timeout (10 s) expires; only then does another worker continue its requests. The kernel
closes the dead process's sockets at once, so this server sees the worker's `WatchWorkers`
stream end abruptly within milliseconds: it tells every other watcher of the same group
(the dead worker's last presence), and they evict the member from the group
(docs/worker.md, "Fast takeover"). A worker that stops on purpose sends a last message with
`leaving` first: that is a goodbye, not a loss.

`Roster` holds the watchers and their bounded outboxes; it does no I/O (the servicer moves the
messages).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from llmstream import telemetry
from llmstream.v1 import model_service_pb2

log = logging.getLogger(__name__)

# Notices waiting to be sent to one watcher. A watcher that does not read them (stuck) loses
# the oldest ones: a missed notice costs the session timeout, the fallback that always works.
OUTBOX_LIMIT = 64


class Watcher:
    def __init__(self, watch_id: int) -> None:
        self.watch_id = watch_id
        self.presence = model_service_pb2.WorkerPresence()
        self.outbox: asyncio.Queue[model_service_pb2.WatchWorkersResponse] = asyncio.Queue(
            OUTBOX_LIMIT
        )
        self.dropped = 0


class Roster:
    def __init__(self) -> None:
        self._watchers: dict[int, Watcher] = {}
        self._ids = itertools.count(1)

    def attach(self) -> Watcher:
        watcher = Watcher(next(self._ids))
        self._watchers[watcher.watch_id] = watcher
        return watcher

    def __len__(self) -> int:
        return len(self._watchers)

    def left(self, watcher: Watcher) -> None:
        """The watcher said goodbye (`leaving`) or this server is stopping: nobody is told."""
        self._watchers.pop(watcher.watch_id, None)

    def lost(self, watcher: Watcher) -> int:
        """The watcher's stream ended abruptly: every other watcher of its group is told.
        Returns how many were. A watcher that never said who it is, or had no group membership
        yet, names nobody to evict."""
        self._watchers.pop(watcher.watch_id, None)
        presence = watcher.presence
        if not presence.member_id or not presence.group:
            return 0
        notice = model_service_pb2.WatchWorkersResponse(lost=presence)
        told = 0
        for other in self._watchers.values():
            if other.presence.group != presence.group:
                continue
            if other.presence.member_id == presence.member_id:
                continue  # the same member watching twice (a reconnect): it is alive
            if other.outbox.full():
                other.outbox.get_nowait()
                other.dropped += 1
                log.warning(
                    "worker watch outbox full: oldest notice dropped",
                    extra=telemetry.fields(
                        watch_id=other.watch_id, worker_id=other.presence.worker_id
                    ),
                )
            other.outbox.put_nowait(notice)
            told += 1
        return told
