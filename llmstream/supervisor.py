"""Background loops that cannot die silently.

A service's long-running loops (consume, commit, housekeeping, lookahead, ...) are spawned
here. If one ends with an exception it is logged with its traceback, remembered, and the
service's readiness turns false (`healthy`), so an orchestrator restarts the process instead
of it running on without its cancels or commits. A loop that returns normally while the
service is not stopping is a failure too: loops are meant to run until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("llmstream.supervisor")


class Supervisor:
    def __init__(self, service: str) -> None:
        self.service = service
        self.tasks: set[asyncio.Task[Any]] = set()
        self.failures: list[str] = []
        self.failed = asyncio.Event()
        self.stopping = False

    @property
    def healthy(self) -> bool:
        return not self.failures

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled() or self.stopping:
            return
        exc = task.exception()
        if exc is None:
            reason = "returned"
            log.error("%s: loop %s ended while running", self.service, task.get_name())
        else:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("%s: loop %s died", self.service, task.get_name(), exc_info=exc)
        self.failures.append(f"{task.get_name()}: {reason}")
        self.failed.set()

    async def stop(self) -> None:
        """Cancel every loop and wait for them (at shutdown)."""
        self.stopping = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
