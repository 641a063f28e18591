"""One-off background tasks: closing a slow socket, a grace timer, freeing stream slots.

Loops that must run for the life of the process are `llmstream.supervisor.Supervisor`'s; these
end by themselves. They are kept referenced until they end (asyncio holds only weak references),
their failures are logged (at DEBUG while the gateway stops), and `cancel_all` ends them at stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("gateway")


class TaskSet:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception:
            if self.stopping:
                log.debug("background task failed during shutdown", exc_info=True)
            else:
                log.exception("background task failed")

    async def cancel_all(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
