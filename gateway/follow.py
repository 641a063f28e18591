"""Who follows a request, across replicas, and the disconnect grace period.

A socket (or an HTTP stream) that follows a request is a member of its watchers set in Redis
(gateway/store.py). When it stops following an unfinished request, a grace timer starts: if
after `GATEWAY_GRACE_S` nobody on any replica follows it and nobody attached meanwhile, the
gateway writes `cancel_requested` (reason `disconnect`) so the engine stops generating. A
background request (OpenAI's `background: true`) is never cancelled that way.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.inflight import Inflight
from gateway.metrics import GatewayMetrics
from gateway.prompts import PromptWriter
from gateway.router import Router
from gateway.store import RequestStore, now_ms
from gateway.tasks import TaskSet


@dataclass(kw_only=True, eq=False)
class Followers:
    store: RequestStore
    router: Router  # the watches of this replica
    inflight: Inflight
    prompts: PromptWriter
    metrics: GatewayMetrics
    tasks: TaskSet
    grace_s: float

    async def attach(self, request_id: str, watcher: str) -> None:
        await self.store.attach(request_id, watcher)

    def detach(self, request_id: str, watcher: str, tenant_id: str, *, grace: bool) -> None:
        """`watcher` stopped following `request_id` (unfinished). With `grace`, cancel the
        request unless someone follows it again within the grace period; without (draining:
        the client reconnects elsewhere), only leave the watchers set."""
        self.tasks.spawn(self._detach(request_id, watcher, tenant_id, now_ms(), grace))

    async def _detach(
        self, request_id: str, watcher: str, tenant_id: str, since_ms: int, grace: bool
    ) -> None:
        await self.store.detach(request_id, watcher)
        if not grace:
            return
        await asyncio.sleep(self.grace_s)
        if self.router.watched(request_id) or self.inflight.finished(request_id):
            return
        if await self.store.wanted_since(request_id, since_ms):
            return
        await self.prompts.cancel(request_id, tenant_id, "disconnect")
        self.metrics.grace_cancels += 1
