"""Replay core: read a range of the topics, fold events into request state, rebuild the
projection into another schema and compare it with the live one.

The same code paths as the aggregator: `codec.decode_record`, `fold`, and for `--rebuild` the very
`ProjectionStore.apply_batch` transaction, pointed at a separate schema.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import sql

from aggregator import pgtext
from aggregator.projection import Coords
from aggregator.store import PROJECTION_TABLES, Batch, ProjectionStore
from llmstream import codec, kafka
from llmstream.fold import RequestState, fold
from llmstream.kafka import PartitionRange
from llmstream.v1 import events_pb2

TIMEOUT_S = kafka.CALL_TIMEOUT_S


class ReplayError(RuntimeError):
    """A replay cannot run as asked (message says why)."""


# -- where to start ---------------------------------------------------------------------------

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)\s*([smhd])(?:\s+ago)?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now_ms: int | None = None) -> int:
    """`2026-11-23T10:00:00Z` (ISO 8601, naive = UTC), epoch milliseconds, or relative `-15m`,
    `2h ago` -> epoch milliseconds."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    t = text.strip()
    if t.isdigit():
        return int(t)
    m = _RELATIVE.match(t)
    if m:
        return now - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)
    try:
        parsed = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(
            f"cannot read time {text!r}: use ISO 8601, epoch ms, or -15m / 2h ago"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


@dataclass(frozen=True)
class Start:
    """Where reading starts: the beginning, an offset (every partition) or a time."""

    offset: int | None = None
    time_ms: int | None = None


def new_consumer(bootstrap: str) -> AIOKafkaConsumer:
    """A reader of committed events only (aborted transactions are not history)."""
    return kafka.reader(
        kafka.Connection(bootstrap),
        "llmstream-replay",
        fetch_max_wait_ms=100,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )


async def partitions(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    out = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await asyncio.wait_for(consumer._client.force_metadata_update(), TIMEOUT_S)
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ReplayError(f"topic {topic!r} does not exist")
        out += [TopicPartition(topic, p) for p in sorted(parts)]
    return out


async def resolve(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    start: Start,
    follow: bool,
    stop_at: dict[tuple[str, int], int] | None = None,
) -> list[PartitionRange]:
    """Offsets to read per partition. `stop_at` caps the end (a rebuild stops at the offsets the
    live projection has reached)."""
    first = await asyncio.wait_for(consumer.beginning_offsets(list(tps)), TIMEOUT_S)
    last = await asyncio.wait_for(consumer.end_offsets(list(tps)), TIMEOUT_S)
    starts = {tp: int(first[tp]) for tp in tps}
    if start.offset is not None:
        starts = {tp: min(max(start.offset, int(first[tp])), int(last[tp])) for tp in tps}
    elif start.time_ms is not None:
        found = await asyncio.wait_for(
            consumer.offsets_for_times({tp: start.time_ms for tp in tps}), TIMEOUT_S
        )
        # No record at or after that time: start at the end (nothing to replay there yet).
        starts = {tp: int(found[tp].offset) if found.get(tp) else int(last[tp]) for tp in tps}
    ranges = []
    for tp in tps:
        end: int | None = None if follow else int(last[tp])
        if stop_at is not None:
            end = stop_at.get((tp.topic, tp.partition), starts[tp])
        ranges.append(PartitionRange(tp, starts[tp], end))
    return ranges


def total_records(ranges: Iterable[PartitionRange]) -> int | None:
    total = 0
    for r in ranges:
        if r.end is None:
            return None
        total += max(0, r.end - r.start)
    return total


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """`replay: 120,000/500,000 records (24%), 85,000 records/s` on stderr, once a second."""

    def __init__(self, total: int | None, out: TextIO = sys.stderr, every_s: float = 1.0) -> None:
        self.total = total
        self.out = out
        self.every_s = every_s
        self.done = 0
        self.started = time.monotonic()
        self._last = self.started
        self._shown = False
        self._tty = out.isatty()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(final=False)

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        part = f"{self.done:,}"
        if self.total:
            part += f"/{self.total:,} records ({100 * self.done / self.total:.0f}%)"
        else:
            part += " records"
        return f"replay: {part}, {self.rate():,.0f} records/s"

    def _print(self, final: bool) -> None:
        end = "\n" if final or not self._tty else ""
        prefix = "\r" if self._tty else ""
        print(prefix + self.line(), end=end, file=self.out, flush=True)
        self._shown = True

    def finish(self) -> None:
        if self._shown or time.monotonic() - self.started >= self.every_s:
            self._print(final=True)


# -- folding replay ---------------------------------------------------------------------------


@dataclass
class BadRecord:
    coords: Coords
    reason: str


@dataclass
class Folded:
    states: dict[str, RequestState] = field(default_factory=dict)
    history: list[tuple[Coords, events_pb2.Event]] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    records: int = 0


def coords_of(record: Any) -> Coords:
    return Coords(record.topic, record.partition, record.offset, record.timestamp)


def fold_records(
    records: Iterable[Any],
    into: Folded,
    request_id: str | None = None,
    on_terminal: Callable[[RequestState], None] | None = None,
    on_event: Callable[[Coords, events_pb2.Event, RequestState], None] | None = None,
) -> None:
    """Decode and fold records; with `request_id`, only that request (its full history kept)."""
    key = request_id.encode() if request_id is not None else None
    for record in records:
        into.records += 1
        if key is not None and record.key != key:
            continue
        coords = coords_of(record)
        try:
            event = codec.decode_record(record)
        except codec.DecodeError as exc:
            into.bad.append(BadRecord(coords, str(exc)))
            continue
        if request_id is not None and event.request_id != request_id:
            continue
        state = into.states.get(event.request_id)
        was_terminal = state is not None and state.terminal
        state = into.states[event.request_id] = fold(state, event)
        if request_id is not None:
            into.history.append((coords, event))
        if on_event is not None:
            on_event(coords, event, state)
        if on_terminal is not None and state.terminal and not was_terminal:
            on_terminal(state)


# -- rebuild and verify -----------------------------------------------------------------------


@dataclass
class RebuildResult:
    records: int = 0
    events: int = 0
    bills: int = 0
    bad: int = 0
    seconds: float = 0.0


async def live_offsets_snapshot(
    conn: psycopg.AsyncConnection[Any], group: str
) -> dict[tuple[str, int], int]:
    """Start a REPEATABLE READ transaction on `conn` (a non-autocommit connection; left open so
    that the verify reads the live projection in this same snapshot) and return the live
    offsets of `group`."""
    await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    await conn.set_read_only(True)
    cur = await conn.execute(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
        (group,),
    )
    return {(str(t), int(p)): int(o) for t, p, o in await cur.fetchall()}


async def rebuild(
    consumer: AIOKafkaConsumer,
    ranges: Sequence[PartitionRange],
    conn: psycopg.AsyncConnection[Any],
    store: ProjectionStore,
    progress: Progress | None = None,
    batch_max: int = 5000,
) -> RebuildResult:
    """Project the ranges into `store`'s (fresh) schema with the aggregator's transaction."""
    result = RebuildResult()
    started = time.monotonic()
    async for records in kafka.read_range(consumer, ranges, max_records=batch_max):
        batch = Batch()
        for record in records:
            coords = coords_of(record)
            batch.consumed(coords)
            try:
                batch.events.append((coords, pgtext.decode(record)))
            except codec.DecodeError:
                result.bad += 1
        outcome = await store.apply_batch(conn, batch)
        result.records += len(records)
        result.events += outcome.folded
        result.bills += len(outcome.ledger)
        result.bad += len(outcome.bad)
        if progress is not None:
            progress.add(len(records))
    result.seconds = time.monotonic() - started
    return result


# Columns that legitimately differ between the live projection and a rebuild.
_IGNORED = {"updated_at", "recorded_at", "id"}
# Key columns per table (rows are matched on these).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "requests": ("request_id",),
    "usage_ledger": ("request_id",),
    "usage_daily": ("day", "tenant_id", "model"),
    "consumer_offsets": ("consumer_group", "topic", "partition"),
}


@dataclass
class Difference:
    table: str
    key: tuple[Any, ...]
    column: str  # "(row)" for a row present on one side only
    live: Any
    rebuilt: Any

    def __str__(self) -> str:
        k = "/".join(str(v) for v in self.key)
        if self.column == "(row)":
            where = "live only" if self.rebuilt is None else "rebuild only"
            return f"{self.table} {k}: row in {where}"
        return f"{self.table} {k}: {self.column}: live={self.live!r} rebuilt={self.rebuilt!r}"


async def _columns(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> list[str]:
    cur = await conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = %s ORDER BY ordinal_position",
        (schema, table),
    )
    return [str(r[0]) for r in await cur.fetchall()]


async def _rows(
    conn: psycopg.AsyncConnection[Any], schema: str, table: str, cols: list[str], group: str
) -> AsyncIterator[tuple[Any, ...]]:
    keys = TABLE_KEYS[table]
    where = sql.SQL(" WHERE consumer_group = %s" if table == "consumer_offsets" else "")
    query = sql.SQL("SELECT {} FROM {}{} ORDER BY {}").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.Identifier(schema, table),
        where,
        sql.SQL(", ").join(_order(k) for k in keys),
    )
    params = (group,) if table == "consumer_offsets" else None
    async with conn.cursor(name=f"verify_{table}") as cur:
        await cur.execute(query, params)
        while rows := await cur.fetchmany(2000):
            for row in rows:
                yield tuple(row)


def _order(column: str) -> sql.Composable:
    if column in ("day", "partition"):
        return sql.Identifier(column)
    return sql.SQL('{} COLLATE "C"').format(sql.Identifier(column))


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    # Match PostgreSQL's ORDER BY ... COLLATE "C" (bytewise) for text keys.
    return tuple(k.encode() if isinstance(k, str) else k for k in key)


async def compare(
    live: psycopg.AsyncConnection[Any],
    live_schema: str,
    rebuilt: psycopg.AsyncConnection[Any],
    rebuilt_schema: str,
    group: str,
    limit: int = 1000,
) -> tuple[int, list[Difference]]:
    """Differences between the live projection (read in `live`'s open snapshot) and the rebuild:
    (total count, the first `limit`). Streams both sides in key order."""
    total = 0
    diffs: list[Difference] = []

    def add(d: Difference) -> None:
        nonlocal total
        total += 1
        if len(diffs) < limit:
            diffs.append(d)

    for table in TABLE_KEYS:
        cols = [c for c in await _columns(live, live_schema, table) if c not in _IGNORED]
        key_idx = [cols.index(k) for k in TABLE_KEYS[table]]
        a_iter = _rows(live, live_schema, table, cols, group).__aiter__()
        async with rebuilt.transaction():
            b_iter = _rows(rebuilt, rebuilt_schema, table, cols, group).__aiter__()
            a = await anext(a_iter, None)
            b = await anext(b_iter, None)
            while a is not None or b is not None:
                ka = tuple(a[i] for i in key_idx) if a is not None else None
                kb = tuple(b[i] for i in key_idx) if b is not None else None
                if kb is None or (ka is not None and _sort_key(ka) < _sort_key(kb)):
                    assert ka is not None
                    add(Difference(table, ka, "(row)", "present", None))
                    a = await anext(a_iter, None)
                elif ka is None or _sort_key(kb) < _sort_key(ka):
                    add(Difference(table, kb, "(row)", None, "present"))
                    b = await anext(b_iter, None)
                else:
                    assert a is not None and b is not None
                    for i, col in enumerate(cols):
                        if a[i] != b[i]:
                            add(Difference(table, ka, col, a[i], b[i]))
                    a = await anext(a_iter, None)
                    b = await anext(b_iter, None)
    return total, diffs


async def current_schema(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute("SELECT current_schema()")
    row = await cur.fetchone()
    if row is None or row[0] is None:
        raise ReplayError("no current schema")
    return str(row[0])


__all__ = [
    "PROJECTION_TABLES",
    "Difference",
    "Folded",
    "PartitionRange",
    "Progress",
    "RebuildResult",
    "ReplayError",
    "Start",
    "compare",
    "fold_records",
    "live_offsets_snapshot",
    "new_consumer",
    "parse_time",
    "partitions",
    "rebuild",
    "resolve",
]
