"""Named models, their limits and versions, and hot swap.

Each name maps to the *current* ``ModelHandle`` (one loaded engine instance). Loading a name
that is already served is a hot swap: the new version loads and warms up while the old one
keeps serving; then new requests go to the new version, and the old one (state RETIRING)
finishes its in-flight streams and is closed when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model_server.engine import Engine
from model_server.engines import build_engine
from model_server.errors import (
    EngineError,
    FailedPrecondition,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from model_server.types import ModelLimits

if TYPE_CHECKING:
    from model_server.generation import Generation

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RETIRING = "retiring"
    UNLOADING = "unloading"
    CLOSED = "closed"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    engine: str
    version: str | None = None
    limits: ModelLimits = field(default_factory=ModelLimits)
    options: Mapping[str, Any] = field(default_factory=dict)


EngineFactory = Callable[[ModelSpec], Engine]


def default_factory(spec: ModelSpec) -> Engine:
    return build_engine(spec.engine, spec.options, spec.limits)


class ModelHandle:
    """One loaded version of a named model."""

    def __init__(self, spec: ModelSpec, engine: Engine) -> None:
        self.spec = spec
        self.engine = engine
        self.state = ModelState.LOADING
        self.in_flight = 0
        self.generations: set[Generation] = set()
        self.loaded_at: float | None = None
        self.health_error = ""
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def limits(self) -> ModelLimits:
        return self.spec.limits

    @property
    def version(self) -> str:
        if self.spec.version:
            return self.spec.version
        return self.engine.info.version if self.state is not ModelState.LOADING else ""

    @property
    def max_context(self) -> int:
        return min(self.limits.max_context, self.engine.info.max_context)

    @property
    def max_concurrency(self) -> int:
        slots = getattr(self.engine, "slots", None)
        return int(slots) if isinstance(slots, int) else self.limits.max_concurrency

    def admit(self) -> None:
        """Count a new stream in, or refuse it (UNAVAILABLE / RESOURCE_EXHAUSTED)."""
        if self.state is not ModelState.READY:
            detail = f": {self.health_error}" if self.health_error else ""
            raise Unavailable(f"model {self.name!r} is {self.state.value}{detail}")
        capacity = self.max_concurrency + self.limits.max_queue
        if self.in_flight >= capacity:
            raise Overloaded(
                f"model {self.name!r} is at capacity ({self.in_flight} streams: "
                f"{self.engine.running} running, {self.engine.waiting} waiting, "
                f"queue limit {self.limits.max_queue})"
            )
        self.in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def wait_idle(self, within_s: float | None) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    def cancel_all(self, reason: str) -> int:
        gens = list(self.generations)
        for gen in gens:
            gen.cancel(reason)
        return len(gens)


class ModelRegistry:
    def __init__(
        self,
        factory: EngineFactory = default_factory,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._factory = factory
        self._on_change = on_change or (lambda: None)
        self._current: dict[str, ModelHandle] = {}
        # Versions not (or no longer) current: loading, retiring, unloading.
        self._others: set[ModelHandle] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lookup ----------------------------------------------------------------------------
    def get(self, name: str) -> ModelHandle:
        handle = self._current.get(name)
        if handle is None:
            loading = any(h.name == name for h in self._others if h.state is ModelState.LOADING)
            if loading:
                raise Unavailable(f"model {name!r} is loading")
            raise ModelNotFound(f"model {name!r} is not served here; see ListModels")
        return handle

    def current(self) -> list[ModelHandle]:
        return [self._current[n] for n in sorted(self._current)]

    def handles(self) -> list[ModelHandle]:
        return [*self._current.values(), *self._others]

    @property
    def serving(self) -> bool:
        """True when at least one model can take requests."""
        return any(h.state is ModelState.READY for h in self._current.values())

    @property
    def loading(self) -> bool:
        return any(h.state is ModelState.LOADING for h in self._others)

    # -- lifecycle -------------------------------------------------------------------------
    async def load(self, spec: ModelSpec) -> tuple[ModelHandle, str | None]:
        """Load (or hot-swap) ``spec``; returns the handle and the replaced version, if any."""
        lock = self._locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            engine = self._factory(spec)
            handle = ModelHandle(spec, engine)
            self._others.add(handle)
            self._on_change()
            started = time.monotonic()
            try:
                await engine.load()
            except BaseException as exc:
                self._others.discard(handle)
                handle.state = ModelState.CLOSED
                self._on_change()
                with contextlib.suppress(Exception):
                    await engine.close()
                if isinstance(exc, Exception):
                    raise FailedPrecondition(f"loading model {spec.name!r} failed: {exc}") from exc
                raise
            handle.state = ModelState.READY
            handle.loaded_at = time.monotonic()
            self._others.discard(handle)
            old = self._current.get(spec.name)
            self._current[spec.name] = handle
            replaced = None
            if old is not None:
                replaced = old.version
                old.state = ModelState.RETIRING
                self._others.add(old)
                self._spawn(self._retire(old))
            log.info(
                "model %s version %s ready (%s engine) in %.2fs%s",
                spec.name,
                handle.version,
                spec.engine,
                handle.loaded_at - started,
                f", replacing {replaced}" if replaced else "",
            )
            self._on_change()
            return handle, replaced

    async def unload(self, name: str, timeout_s: float) -> int:
        """Stop serving ``name``: in-flight streams get ``timeout_s`` to finish, then are
        cancelled. Returns how many were cancelled."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            handle = self._current.pop(name, None)
            if handle is None:
                raise ModelNotFound(f"model {name!r} is not served here")
            handle.state = ModelState.UNLOADING
            self._others.add(handle)
            self._on_change()
            cancelled = await self._drain(handle, timeout_s, "model unloaded")
            await self._close(handle)
            return cancelled

    async def drain(self, timeout_s: float, reason: str) -> int:
        """Wait for every in-flight stream (all versions) up to ``timeout_s``; cancel the rest."""
        handles = self.handles()
        deadline = time.monotonic() + timeout_s
        for h in handles:
            await h.wait_idle(max(0.0, deadline - time.monotonic()))
        cancelled = sum(h.cancel_all(reason) for h in handles)
        for h in handles:
            # Cancelled streams send their final message; give them a moment to do so.
            await h.wait_idle(5.0)
        return cancelled

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for h in self.handles():
            h.cancel_all("server stopped")
        for h in self.handles():
            await h.wait_idle(2.0)
            await self._close(h)
        self._current.clear()
        self._others.clear()

    async def check_health(self) -> None:
        """Ask every engine; a failing one stops taking requests until it recovers."""
        changed = False
        for h in list(self._current.values()):
            if h.state not in (ModelState.READY, ModelState.UNHEALTHY):
                continue
            try:
                await h.engine.check_health()
            except Exception as exc:
                if h.state is not ModelState.UNHEALTHY:
                    log.error("model %s is unhealthy: %s", h.name, exc)
                    h.state, h.health_error, changed = ModelState.UNHEALTHY, str(exc), True
            else:
                if h.state is ModelState.UNHEALTHY:
                    log.info("model %s is healthy again", h.name)
                    h.state, h.health_error, changed = ModelState.READY, "", True
        if changed:
            self._on_change()

    # -- internals -------------------------------------------------------------------------
    async def _retire(self, handle: ModelHandle) -> None:
        # In-flight streams end on their own within the request timeout; a stream whose
        # client stopped reading could hold the old version forever, so bound the wait.
        limit = (handle.limits.request_timeout_s or 3600.0) + 30.0
        cancelled = await self._drain(handle, limit, "model version replaced")
        await self._close(handle)
        log.info(
            "model %s version %s unloaded after hot swap%s",
            handle.name,
            handle.version,
            f" ({cancelled} streams cancelled)" if cancelled else "",
        )

    async def _drain(self, handle: ModelHandle, timeout_s: float, reason: str) -> int:
        if await handle.wait_idle(timeout_s):
            return 0
        n = handle.cancel_all(reason)
        await handle.wait_idle(5.0)
        return n

    async def _close(self, handle: ModelHandle) -> None:
        if handle.state is ModelState.CLOSED:
            return
        version = handle.version
        handle.state = ModelState.CLOSED
        try:
            await handle.engine.close()
        except (EngineError, Exception) as exc:  # closing must not take the server down
            log.warning("closing model %s version %s failed: %s", handle.name, version, exc)
        self._others.discard(handle)
        self._on_change()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
