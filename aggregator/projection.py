"""Pure core of the projection: a batch of events + the stored state of their requests ->
new request rows, bills, rollup increments and bad events. No I/O; `store.py` runs it inside
one PostgreSQL transaction.

State persistence: the folded `RequestState` of a request lives in its `requests` row
(`fold_state` jsonb = `RequestState.as_dict()` without text, `text` column when text is
stored). A batch loads the rows of the requests it touches (`SELECT ... FOR UPDATE`), rebuilds
each state with `RequestState.from_dict`, folds the batch's events with the shared `fold`, and
writes the rows back in the same transaction as the consumed offsets. Nothing survives in
memory between batches, so a process that dies between (or inside) any two batches resumes
exactly where the last committed transaction left it.

Billing rule: a request is billed once, when it is terminal *and* its `submitted` event has
been folded (model, tenant and reservation known). The two events live on different topics, so
either may come first; a terminal event whose request has no `submitted` yet leaves the request
parked (terminal, not billed) in its row until the `submitted` arrives.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aggregator.ledger import PriceBook
from llmstream.fold import RequestState, Status, fold, is_terminal
from llmstream.v1 import events_pb2

PROMPT_KINDS = frozenset({"submitted", "cancel_requested"})
# Derived values of `as_dict` that are not state (recomputed on load).
_DERIVED = ("ttft_ms", "tokens_folded", "text")


@dataclass(frozen=True)
class Coords:
    """Where a record is in the log."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int = 0

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass
class Stored:
    """A request as the projection keeps it between batches."""

    state: RequestState
    billed: bool = False
    # The record whose fold made the request terminal (for the ledger's audit columns).
    terminal_source: Coords | None = None
    # Loaded from a row that had no state yet (created for the current batch).
    placeholder: bool = False


@dataclass(frozen=True)
class BadEvent:
    coords: Coords
    reason: str
    detail: str
    request_id: str = ""


@dataclass(frozen=True)
class Bill:
    """A ledger row before pricing: created once per request."""

    request_id: str
    tenant_id: str
    model: str
    status: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    billed_at_ms: int
    submitted_at_ms: int
    reserved_tokens: int
    source: Coords | None

    @property
    def used_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class LedgerRow:
    bill: Bill
    cost: Decimal | None
    currency: str | None
    price_effective_from: dt.datetime | None


@dataclass
class RollupDelta:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    unpriced: int = 0


@dataclass
class FoldResult:
    changed: dict[str, Stored] = field(default_factory=dict)
    bills: list[Bill] = field(default_factory=list)
    bad: list[BadEvent] = field(default_factory=list)
    parked: list[tuple[Coords, str]] = field(default_factory=list)
    folded: int = 0


def fold_batch(
    stored: dict[str, Stored], events: Sequence[tuple[Coords, events_pb2.Event]]
) -> FoldResult:
    """Fold `events` (in log order per partition) into `stored` (mutated) and find new bills.

    `stored` holds the persisted requests of the batch; requests not in it start empty.
    """
    result = FoldResult()
    terminals: list[tuple[Coords, str]] = []
    # Prompts-topic events first: any order that keeps each partition's own order folds to the
    # same state (fold is order-tolerant across topics), and a submit folded before its
    # terminal event avoids parking the request for nothing.
    for coords, event in sorted(events, key=_submits_first):
        rid = event.request_id
        if not event.tenant_id:
            result.bad.append(BadEvent(coords, "tenant_missing", "event has no tenant_id", rid))
            continue
        entry = stored.get(rid)
        if entry is None:
            entry = stored[rid] = Stored(RequestState(request_id=rid))
        state = entry.state
        if state.tenant_id and event.tenant_id != state.tenant_id:
            result.bad.append(
                BadEvent(
                    coords,
                    "tenant_mismatch",
                    f"event tenant {event.tenant_id!r} != request tenant {state.tenant_id!r}",
                    rid,
                )
            )
            continue
        was_terminal = state.terminal
        fold(state, event)
        result.folded += 1
        result.changed[rid] = entry
        if not was_terminal and state.terminal:
            entry.terminal_source = coords
        if is_terminal(event):
            terminals.append((coords, rid))
    # Terminal events of requests whose submit has not been folded yet: the request waits
    # (parked) in its row and is billed when the submit arrives. Normal when the tokens topic is
    # ahead of the prompts topic; a request still parked after a grace period is reported as a
    # bad event (`terminal_unknown_request`) by the aggregator's orphan check.
    result.parked = [(c, rid) for c, rid in terminals if not stored[rid].state.submitted_seen]
    for entry in result.changed.values():
        bill = bill_for(entry)
        if bill is not None:
            entry.billed = True
            result.bills.append(bill)
    return result


def _submits_first(item: tuple[Coords, events_pb2.Event]) -> int:
    return 0 if item[1].WhichOneof("body") in PROMPT_KINDS else 1


def bill_for(entry: Stored) -> Bill | None:
    """The bill a request owes now, or None (not terminal, unknown, or already billed)."""
    s = entry.state
    if entry.billed or not s.terminal or not s.submitted_seen or not s.tenant_id:
        return None
    # Event times only (never the batch's clock), so a rebuild bills at the same instant.
    # Events without event_time (not written by llmstream code) fall back to the submit time.
    submitted_at = s.submitted_at_ms or 0
    billed_at = s.finished_at_ms if s.finished_at_ms is not None else submitted_at
    # Billing policy (docs/gateway.md): a request that failed or was cancelled before it
    # started (no model server streamed it: cancelled before start, no model server could take
    # it, refused before the stream, a worker crash) owes nothing; the usage its terminal event
    # reports is the gateway's estimate, kept in the requests row. Its bill row has 0 tokens,
    # and settlement frees its whole reservation.
    started = (
        s.attempts > 0 or s.last_seq > 0 or s.status not in (Status.FAILED, Status.CANCELLED)
    ) or s.status not in (Status.FAILED, Status.CANCELLED)
    return Bill(
        request_id=s.request_id,
        tenant_id=s.tenant_id,
        model=s.model,
        status=s.status.value,
        finish_reason=s.finish_reason,
        prompt_tokens=s.prompt_tokens if started else 0,
        completion_tokens=s.completion_tokens if started else 0,
        billed_at_ms=billed_at,
        submitted_at_ms=submitted_at,
        reserved_tokens=s.reserved_tokens,
        source=entry.terminal_source,
    )


def price(bills: Iterable[Bill], book: PriceBook) -> list[LedgerRow]:
    rows = []
    for b in bills:
        cost = book.cost(b.model, ms_to_dt(b.billed_at_ms), b.prompt_tokens, b.completion_tokens)
        rows.append(
            LedgerRow(
                bill=b,
                cost=None if cost is None else cost.amount,
                currency=None if cost is None else cost.currency,
                price_effective_from=None if cost is None else cost.price_effective_from,
            )
        )
    return rows


def rollup(rows: Iterable[LedgerRow]) -> dict[tuple[dt.date, str, str], RollupDelta]:
    """Increments of the daily usage rollup (UTC day of `billed_at`, tenant, model)."""
    out: dict[tuple[dt.date, str, str], RollupDelta] = {}
    for row in rows:
        b = row.bill
        key = (ms_to_dt(b.billed_at_ms).date(), b.tenant_id, b.model)
        d = out.setdefault(key, RollupDelta())
        d.requests += 1
        if b.status == Status.COMPLETED:
            d.completed += 1
        elif b.status == Status.CANCELLED:
            d.cancelled += 1
        elif b.status == Status.FAILED:
            d.failed += 1
        d.prompt_tokens += b.prompt_tokens
        d.completion_tokens += b.completion_tokens
        if row.cost is None:
            d.unpriced += 1
        else:
            d.cost += row.cost
    return out


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def ms_to_dt(ms: int | None) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=ms or 0)


def dt_to_ms(value: dt.datetime) -> int:
    return (value - EPOCH) // _MS


def _opt_dt(ms: int | None) -> dt.datetime | None:
    return None if ms is None else ms_to_dt(ms)


def persisted_state(state: RequestState) -> dict[str, Any]:
    """What `fold_state` stores: everything the fold needs to continue, minus text."""
    data = state.as_dict(include_text=False)
    for key in _DERIVED:
        data.pop(key, None)
    return data


# Column order of the `requests` table as written by the projection.
REQUEST_COLUMNS = (
    "request_id",
    "tenant_id",
    "model",
    "status",
    "submitted_at",
    "started_at",
    "first_token_at",
    "finished_at",
    "ttft_ms",
    "finish_reason",
    "finish_message",
    "error_code",
    "prompt_tokens",
    "completion_tokens",
    "reserved_tokens",
    "attempts",
    "last_seq",
    "cancel_requested",
    "text",
    "fold_state",
    "billed",
    "terminal_topic",
    "terminal_partition",
    "terminal_offset",
)


def to_row(entry: Stored, store_text: bool) -> dict[str, Any]:
    s = entry.state
    src = entry.terminal_source
    return {
        "request_id": s.request_id,
        "tenant_id": s.tenant_id or None,
        "model": s.model or None,
        "status": s.status.value,
        "submitted_at": _opt_dt(s.submitted_at_ms),
        "started_at": _opt_dt(s.started_at_ms),
        "first_token_at": _opt_dt(s.first_token_at_ms),
        "finished_at": _opt_dt(s.finished_at_ms),
        "ttft_ms": s.ttft_ms,
        "finish_reason": s.finish_reason or None,
        "finish_message": s.finish_message or None,
        "error_code": s.error_code or None,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "reserved_tokens": s.reserved_tokens,
        "attempts": s.attempts,
        "last_seq": s.last_seq,
        "cancel_requested": s.cancel_requested,
        "text": s.text if store_text else None,
        "fold_state": persisted_state(s),
        "billed": entry.billed,
        "terminal_topic": None if src is None else src.topic,
        "terminal_partition": None if src is None else src.partition,
        "terminal_offset": None if src is None else src.offset,
    }


def from_row(
    request_id: str,
    fold_state: dict[str, Any] | None,
    text: str | None,
    billed: bool,
    terminal: tuple[str | None, int | None, int | None],
) -> Stored:
    """Rebuild what `to_row` wrote (a placeholder row has an empty fold_state)."""
    placeholder = not fold_state
    if fold_state:
        state = RequestState.from_dict({**fold_state, "request_id": request_id, "text": text})
    else:
        state = RequestState(request_id=request_id)
    topic, partition, offset = terminal
    source = (
        Coords(topic, partition, offset)
        if topic is not None and partition is not None and offset is not None
        else None
    )
    return Stored(state=state, billed=billed, terminal_source=source, placeholder=placeholder)
