"""The model catalog at the gateway: which models are served, and their limits.

`Models` follows the catalog topic (llmstream/catalog.py `CatalogFollower`: workers announce
their model servers' models there) in a supervised loop, and answers the admission
(`view`: a `ModelView`, decided by gateway/admission.py `model_limit`) and `GET /v1/models`
(`served`). Both front ends submit through the admission, so the WebSocket and the OpenAI
routes refuse the same models and apply the same limits.

The catalog decides once it has been read to the end of the topic and lists at least one
served model; until then requests go through unchecked (admission.py `ModelView` says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.admission import UNCHECKED, ModelView
from gateway.store import now_ms
from llmstream import kafka, telemetry
from llmstream.catalog import CatalogError, CatalogFollower, ModelEntry

log = logging.getLogger("gateway")

# A failed catalog read starts again after this long, doubling up to the cap.
RETRY_S = 0.5
RETRY_MAX_S = 10.0


@dataclass(kw_only=True, eq=False)
class Models:
    follower: CatalogFollower
    clock_ms: Callable[[], int] = now_ms

    @classmethod
    def following(cls, connection: kafka.Connection, topic: str, gateway_id: str) -> Models:
        return cls(follower=CatalogFollower(connection, topic, f"{gateway_id}-catalog"))

    @property
    def ready(self) -> bool:
        """The catalog has been read to its end once."""
        return self.follower.ready.is_set()

    async def run(self) -> None:
        """The supervised loop: follow the catalog topic. A read failure (a broker restarting)
        is logged and the follower starts again, re-reading the compacted topic from its start
        (the fold is idempotent); what it knew stays meanwhile. A missing topic is a deployment
        error: the loop ends with it, and readiness names it."""
        delay = RETRY_S
        while True:
            try:
                await self.follower.run()
            except CatalogError:
                raise
            except Exception as exc:
                log.warning(
                    "model catalog read failed; retrying",
                    extra=telemetry.fields(error=repr(exc), retry_s=delay),
                )
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)

    def served(self) -> list[ModelEntry]:
        """The models served now, by name."""
        return self.follower.catalog.models(self.clock_ms())

    def get(self, model: str) -> ModelEntry | None:
        return self.follower.catalog.get(model, self.clock_ms())

    def view(self, model: str) -> ModelView:
        """What the admission needs to know of `model` (gateway/admission.py `model_limit`)."""
        if not self.ready or not self.served():
            return UNCHECKED
        entry = self.get(model)
        if entry is not None:
            # max_tokens bounds a request at the model server; without it, the context does.
            return ModelView(True, served=True, limit=entry.max_tokens or entry.max_context)
        last = self.follower.catalog.last_known(model)
        if last is None:
            return ModelView(True)
        return ModelView(True, known=True, retry_after_ms=max(1000, last.interval_ms))
