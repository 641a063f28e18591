"""Which waiting request starts next: weighted fair share over tenants by token cost, priority
classes with aging. Pure and synchronous (the caller passes the clock); docs/scheduling.md.

**Fair share: a virtual token counter per tenant** (VTC, Sheng et al., "Fairness in Serving
Large Language Models", OSDI 2024). Each tenant has a counter of the service it was given: the
token cost of every request of it that started, divided by its weight (its tier's share). The
next request is the oldest one of the backlogged tenant with the smallest counter. A tenant
that becomes backlogged again after a pause has its counter lifted to the smallest counter of
the tenants waiting (or, if none waits, to the counter of the last tenant served), so idling
banks no credit: a tenant cannot save up service and then lock everybody out with a burst.
The policy is work-conserving: whenever anything waits, something is picked, so a tenant alone
gets every slot. When a request ends, `settle` replaces its charged estimate by what it really
cost, so a tenant whose requests stop early is not charged for tokens it never got.

**Priority classes with aging.** A request's class is its `priority` (higher first; 0 is the
default class). The class with the highest *effective* priority is served first, and fair
share decides within it. A request's effective priority rises by one per `aging_s` it has
waited, up to the highest class waiting: a low class is never starved, it only gets in line
with the top class after waiting, and fair share then shares the slots between them. Capping
at the highest class waiting keeps aging from ranking old requests of a noisy tenant above a
quiet tenant's new request of the same class (that would be FIFO again).

Cost of a request: its `max_tokens` plus its prompt tokens / `PREFILL_DISCOUNT` (a prefill
step processes the whole prompt at once; per token it costs an order of magnitude less than a
decode step). Picking is O(tenants x classes waiting); the queue itself is bounded by the
caller (`worker.read_ahead`).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# A prompt token costs this many times less than a generated one (prefill is batched).
PREFILL_DISCOUNT = 8
# Idle tenants whose counter is remembered (they were served more than the floor): the oldest
# are forgotten beyond this, a bound on memory whatever the number of tenants.
IDLE_TENANTS_LIMIT = 4096
# The cost of a request whose max_tokens is unset (0: the model's default applies), a typical
# default completion length.
UNSET_MAX_TOKENS_COST = 256


def request_cost(
    max_tokens: int, prompt_tokens: int, unset_cost: int = UNSET_MAX_TOKENS_COST
) -> float:
    """What starting a request charges its tenant, in generated-token equivalents."""
    generated = max_tokens if max_tokens > 0 else unset_cost
    return max(1.0, generated + prompt_tokens / PREFILL_DISCOUNT)


@dataclass
class Entry(Generic[T]):
    item: T
    tenant: str
    priority: int
    cost: float
    weight: float
    arrived: float  # the caller's clock (seconds)
    order: int  # arrival order: ties go to the older request


@dataclass
class _Tenant(Generic[T]):
    counter: float = 0.0
    classes: dict[int, deque[Entry[T]]] = field(default_factory=dict)
    waiting: int = 0


class FairQueue(Generic[T]):
    """Waiting requests; `pop` returns the next to start. Unbounded itself: the caller bounds
    what it adds (the read-ahead window)."""

    def __init__(self, aging_s: float) -> None:
        if aging_s <= 0:
            raise ValueError("aging_s must be > 0")
        self.aging_s = aging_s
        self._tenants: dict[str, _Tenant[T]] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # tenants with nothing waiting
        self._floor = 0.0  # counter of the last tenant served, before its charge
        self._order = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def counter(self, tenant: str) -> float:
        """The tenant's service so far (weighted tokens; 0 for a tenant never seen)."""
        state = self._tenants.get(tenant)
        return state.counter if state is not None else 0.0

    def add(
        self, item: T, *, tenant: str, priority: int, cost: float, weight: float, now: float
    ) -> None:
        if weight <= 0:
            raise ValueError("weight must be > 0")
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        if state.waiting == 0:
            # Becoming backlogged: no credit for the time it was idle.
            state.counter = max(state.counter, self._lift_to(tenant))
            self._idle.pop(tenant, None)
        entry = Entry(item, tenant, priority, cost, weight, now, next(self._order))
        state.classes.setdefault(priority, deque()).append(entry)
        state.waiting += 1
        self._len += 1

    def pop(self, now: float, eligible: Callable[[str], bool] | None = None) -> Entry[T] | None:
        """The next request to start (its tenant charged its cost), or None if none waits;
        only among the tenants `eligible` accepts, if given."""
        best: tuple[float, float, int] | None = None
        chosen: deque[Entry[T]] | None = None
        heads = [h for h in self._heads() if eligible is None or eligible(h[1].tenant)]
        if not heads:
            return None
        top = max(entry.priority for _state, entry, _queue in heads)
        for state, entry, queue in heads:
            aged = entry.priority + math.floor(max(0.0, now - entry.arrived) / self.aging_s)
            key = (-min(aged, top), state.counter, entry.order)
            if best is None or key < best:
                best, chosen = key, queue
        assert chosen is not None
        entry = chosen.popleft()
        state = self._tenants[entry.tenant]
        if not chosen:
            del state.classes[entry.priority]
        state.waiting -= 1
        self._len -= 1
        self._floor = state.counter
        state.counter += entry.cost / entry.weight
        if state.waiting == 0:
            self._went_idle(entry.tenant)
        return entry

    def settle(self, tenant: str, charged: float, used: float, weight: float) -> None:
        """A started request ended having cost `used` instead of the `charged` estimate."""
        state = self._tenants.get(tenant)
        if state is not None and weight > 0:
            state.counter += (used - charged) / weight

    def remove(self, unwanted: Callable[[T], bool]) -> list[T]:
        """Take out every waiting item for which `unwanted` is true (partitions revoked)."""
        removed: list[T] = []
        for tenant, state in list(self._tenants.items()):
            for priority, queue in list(state.classes.items()):
                kept = deque(e for e in queue if not unwanted(e.item))
                removed += [e.item for e in queue if unwanted(e.item)]
                if kept:
                    state.classes[priority] = kept
                else:
                    del state.classes[priority]
            gone = state.waiting - sum(len(q) for q in state.classes.values())
            if gone:
                state.waiting -= gone
                self._len -= gone
                if state.waiting == 0:
                    self._went_idle(tenant)
        return removed

    def _heads(self) -> Iterator[tuple[_Tenant[T], Entry[T], deque[Entry[T]]]]:
        for state in self._tenants.values():
            for queue in state.classes.values():
                yield state, queue[0], queue

    def _lift_to(self, tenant: str) -> float:
        waiting = [s.counter for t, s in self._tenants.items() if s.waiting and t != tenant]
        return min(waiting) if waiting else self._floor

    def _went_idle(self, tenant: str) -> None:
        self._idle[tenant] = None
        while len(self._idle) > IDLE_TENANTS_LIMIT:
            old, _ = self._idle.popitem(last=False)
            # Forgetting a tenant loses only its debt above the floor: bounded memory wins.
            del self._tenants[old]
