"""A client's cancel, written once: the `cancel_requested` event costs an acknowledged Kafka
write, so a cancel of a request that already ended is answered from state (no write), and a
repeated cancel (this or another replica, this or another client) is written only once: the
request's record in Redis says so (`RequestStore.claim_cancel`, atomic). Rate limits are the
front ends' (gateway/limits.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import Enum

from gateway.inflight import Inflight
from gateway.metrics import GatewayMetrics
from gateway.prompts import PromptWriter
from gateway.store import RequestMeta, RequestStore


class Cancelled(Enum):
    WRITTEN = "written"  # a cancel_requested event was written
    DUPLICATE = "duplicate"  # one was written before: nothing written now
    FINISHED = "finished"  # the request had ended: nothing written


@dataclass(kw_only=True, eq=False)
class Cancels:
    store: RequestStore
    prompts: PromptWriter
    inflight: Inflight
    metrics: GatewayMetrics

    async def cancel(self, meta: RequestMeta, reason: str = "client") -> Cancelled:
        """Cancel `meta`'s request (already tenant-checked by the lookup that found it)."""
        rid = meta.request_id
        if meta.finished or self.inflight.finished(rid):
            result = Cancelled.FINISHED
        elif not await self.store.claim_cancel(rid):
            result = Cancelled.DUPLICATE
        else:
            try:
                await self.prompts.cancel(rid, meta.tenant_id, reason)
            except BaseException:
                # Not written (or not known to be): a later cancel may try again.
                with contextlib.suppress(Exception):
                    await self.store.unclaim_cancel(rid)
                raise
            result = Cancelled.WRITTEN
        self.metrics.cancels[result.value] += 1
        return result
