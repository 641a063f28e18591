"""The projection's PostgreSQL side: one batch = one transaction.

`ProjectionStore.apply_batch` does, inside one transaction and in this lock order (the same
in every transaction, so concurrent aggregators cannot deadlock each other):

1. fence: lock the batch's `consumer_offsets` rows and check that nobody stored a position past
   the batch's first record (a consumer that lost its partitions in a rebalance — a zombie —
   fails here and re-seeks instead of writing twice);
2. lock the batch's `requests` rows (placeholders inserted first, ids in sorted order) and
   rebuild their folded state;
3. fold (pure, `projection.fold_batch`), price new bills;
4. write the rows, the ledger, the daily rollup, the quota outbox and the new offsets.

The commit makes all of it visible at once: a crash anywhere before it loses nothing and
writes nothing; a crash after it has already stored the offsets it resumes from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from aggregator import projection
from aggregator.ledger import Price, PriceBook
from aggregator.projection import Coords, LedgerRow, Stored
from llmstream.v1 import events_pb2

TopicPartitionKey = tuple[str, int]

# Tables a rebuild recreates (everything the aggregator writes).
PROJECTION_TABLES = ("requests", "usage_ledger", "usage_daily", "consumer_offsets", "quota_outbox")

AsyncConn = psycopg.AsyncConnection[Any]


class Fenced(RuntimeError):
    """Stored offsets are past this batch: another consumer already projected these records."""

    def __init__(self, moved: dict[TopicPartitionKey, tuple[int, int]]) -> None:
        self.moved = moved
        detail = ", ".join(f"{t}/{p}: stored {s} > batch {b}" for (t, p), (s, b) in moved.items())
        super().__init__(f"offsets moved by another consumer ({detail})")


@dataclass(frozen=True)
class Settlement:
    """A quota settlement owed to Redis (outbox row)."""

    request_id: str
    tenant_id: str
    submitted_at_ms: int
    reserved_tokens: int
    used_tokens: int


@dataclass
class BatchOutcome:
    folded: int = 0
    requests: int = 0
    ledger: list[LedgerRow] = field(default_factory=list)
    bad: list[projection.BadEvent] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)
    parked: list[tuple[Coords, str]] = field(default_factory=list)
    offset_gaps: int = 0
    # Bills that hit the ledger's unique constraint (must stay 0: counted and logged).
    duplicate_bills: int = 0
    next_offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)


@dataclass
class Batch:
    """Decoded records of one transaction, in log order per partition."""

    events: list[tuple[Coords, events_pb2.Event]] = field(default_factory=list)
    # Every record consumed (decoded or not) moves the offsets.
    first_offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    next_offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)

    def consumed(self, coords: Coords) -> None:
        """Record a consumed record (records of a partition arrive in offset order)."""
        key = (coords.topic, coords.partition)
        if key not in self.first_offsets:
            self.first_offsets[key] = coords.offset
        self.next_offsets[key] = coords.offset + 1


class ProjectionStore:
    """Reads and writes one projection (the live one, or a rebuild in another schema)."""

    def __init__(
        self,
        group: str,
        schema: str | None = None,
        store_text: bool = True,
        quota_outbox: bool = True,
        prices_schema: str | None = None,
    ) -> None:
        self.group = group
        self.schema = schema
        self.store_text = store_text
        self.quota_outbox = quota_outbox
        self.prices_schema = prices_schema

    def t(self, name: str) -> sql.Composable:
        if self.schema:
            return sql.Identifier(self.schema, name)
        return sql.Identifier(name)

    def _prices(self) -> sql.Composable:
        if self.prices_schema:
            return sql.Identifier(self.prices_schema, "prices")
        return sql.Identifier("prices")

    # -- offsets ---------------------------------------------------------------------------

    async def load_offsets(
        self, conn: AsyncConn, partitions: Iterable[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """Stored next offsets of these partitions (absent: never consumed by this group)."""
        keys = sorted(set(partitions))
        if not keys:
            return {}
        cur = await conn.execute(
            sql.SQL(
                "SELECT topic, partition, next_offset FROM {} WHERE consumer_group = %s"
                " AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))"
            ).format(self.t("consumer_offsets")),
            (self.group, [k[0] for k in keys], [k[1] for k in keys]),
        )
        return {(str(t), int(p)): int(o) for t, p, o in await cur.fetchall()}

    async def _fence(self, conn: AsyncConn, batch: Batch) -> int:
        """Lock the batch's offset rows; raise Fenced if any moved past the batch. Returns the
        number of offsets skipped between the stored positions and the batch (0 unless the
        topic has transaction markers or was compacted: worth watching)."""
        keys = sorted(batch.first_offsets)
        topics, parts = [k[0] for k in keys], [k[1] for k in keys]
        firsts = [batch.first_offsets[k] for k in keys]
        table = self.t("consumer_offsets")
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (consumer_group, topic, partition, next_offset)"
                " SELECT %s, t, p, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS u(t, p, o)"
                " ORDER BY t, p ON CONFLICT DO NOTHING"
            ).format(table),
            (self.group, topics, parts, firsts),
        )
        cur = await conn.execute(
            sql.SQL(
                "SELECT topic, partition, next_offset FROM {} WHERE consumer_group = %s"
                " AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))"
                " ORDER BY topic, partition FOR UPDATE"
            ).format(table),
            (self.group, topics, parts),
        )
        moved = {}
        gaps = 0
        for topic, partition, stored in await cur.fetchall():
            key = (str(topic), int(partition))
            # stored < first is fine: offsets can have gaps (transaction markers, compaction).
            if int(stored) > batch.first_offsets[key]:
                moved[key] = (int(stored), batch.first_offsets[key])
            gaps += max(0, batch.first_offsets[key] - int(stored))
        if moved:
            raise Fenced(moved)
        return gaps

    # -- the batch ---------------------------------------------------------------------------

    async def apply_batch(self, conn: AsyncConn, batch: Batch) -> BatchOutcome:
        """Project one batch in one transaction (the caller retries on serialization errors)."""
        outcome = BatchOutcome(next_offsets=dict(batch.next_offsets))
        if not batch.first_offsets:
            return outcome
        async with conn.transaction():
            outcome.offset_gaps = await self._fence(conn, batch)
            ids = sorted({e.request_id for _, e in batch.events})
            stored = await self._lock_requests(conn, ids)
            result = projection.fold_batch(stored, batch.events)
            outcome.folded = result.folded
            outcome.bad = result.bad
            outcome.parked = result.parked
            outcome.requests = len(result.changed)
            if result.bills:
                book = await self._price_book(conn, {b.model for b in result.bills})
                outcome.ledger = projection.price(result.bills, book)
            await self._write_requests(conn, result.changed.values())
            # Rows created for this batch whose every event was refused (bad events).
            unused = [
                rid for rid, e in stored.items() if rid not in result.changed and e.placeholder
            ]
            if unused:
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE request_id = ANY(%s::text[])").format(
                        self.t("requests")
                    ),
                    (unused,),
                )
            if outcome.ledger:
                outcome.duplicate_bills = await self._write_ledger(conn, outcome.ledger)
                await self._write_rollup(conn, outcome.ledger)
                if self.quota_outbox:
                    outcome.settlements = await self._write_outbox(conn, outcome.ledger)
            await self._store_offsets(conn, batch.next_offsets)
        return outcome

    async def _lock_requests(self, conn: AsyncConn, ids: list[str]) -> dict[str, Stored]:
        if not ids:
            return {}
        table = self.t("requests")
        # Placeholders first, so that every row exists and can be locked in id order.
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (request_id) SELECT id FROM unnest(%s::text[]) AS u(id)"
                " ORDER BY id ON CONFLICT DO NOTHING"
            ).format(table),
            (ids,),
        )
        cur = await conn.execute(
            sql.SQL(
                "SELECT request_id, fold_state, text, billed, terminal_topic, terminal_partition,"
                " terminal_offset FROM {} WHERE request_id = ANY(%s::text[])"
                " ORDER BY request_id FOR UPDATE"
            ).format(table),
            (ids,),
        )
        out: dict[str, Stored] = {}
        for rid, state, text, billed, t_topic, t_part, t_off in await cur.fetchall():
            out[rid] = projection.from_row(rid, state, text, bool(billed), (t_topic, t_part, t_off))
        return out

    async def _price_book(self, conn: AsyncConn, models: set[str]) -> PriceBook:
        cur = await conn.execute(
            sql.SQL(
                "SELECT model, effective_from, prompt_per_1k, completion_per_1k, currency"
                " FROM {} WHERE model = ANY(%s::text[])"
            ).format(self._prices()),
            ([*sorted(models), "*"],),
        )
        return PriceBook(Price(*row) for row in await cur.fetchall())

    async def _write_requests(self, conn: AsyncConn, entries: Iterable[Stored]) -> None:
        # executemany runs in pipeline mode (one round trip); measured faster here than one
        # UPDATE ... FROM unnest(arrays) for batches of a few hundred rows.
        rows = sorted(
            (projection.to_row(e, self.store_text) for e in entries), key=lambda r: r["request_id"]
        )
        if not rows:
            return
        for row in rows:
            row["fold_state"] = Jsonb(row["fold_state"])
        cols = [c for c in projection.REQUEST_COLUMNS if c != "request_id"]
        query = sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE request_id = %(request_id)s")
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c)) for c in cols
        )
        async with conn.cursor() as cur:
            await cur.executemany(query.format(self.t("requests"), assignments), rows)

    async def _write_ledger(self, conn: AsyncConn, rows: list[LedgerRow]) -> int:
        cols = (
            "request_id",
            "tenant_id",
            "model",
            "status",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "cost",
            "currency",
            "price_effective_from",
            "billed_at",
            "submitted_at",
            "reserved_tokens",
            "source_topic",
            "source_partition",
            "source_offset",
        )
        types = (
            "text",
            "text",
            "text",
            "text",
            "text",
            "bigint",
            "bigint",
            "numeric",
            "text",
            "timestamptz",
            "timestamptz",
            "timestamptz",
            "bigint",
            "text",
            "integer",
            "bigint",
        )
        columns: list[list[Any]] = [[] for _ in cols]
        for r in sorted(rows, key=lambda r: r.bill.request_id):
            b, src = r.bill, r.bill.source
            values = (
                b.request_id,
                b.tenant_id,
                b.model,
                b.status,
                b.finish_reason,
                b.prompt_tokens,
                b.completion_tokens,
                r.cost,
                r.currency,
                r.price_effective_from,
                projection.ms_to_dt(b.billed_at_ms),
                projection.ms_to_dt(b.submitted_at_ms),
                b.reserved_tokens,
                None if src is None else src.topic,
                None if src is None else src.partition,
                None if src is None else src.offset,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        query = sql.SQL(
            "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT (request_id) DO NOTHING"
        ).format(
            self.t("usage_ledger"),
            sql.SQL(", ").join(map(sql.Identifier, cols)),
            sql.SQL(", ").join(sql.SQL("%s::" + t + "[]") for t in types),
        )
        cur = await conn.execute(query, columns)
        return len(rows) - cur.rowcount

    async def _write_rollup(self, conn: AsyncConn, rows: list[LedgerRow]) -> None:
        deltas = projection.rollup(rows)
        keys = sorted(deltas)
        d = [deltas[k] for k in keys]
        counters = (
            "requests",
            "completed",
            "cancelled",
            "failed",
            "prompt_tokens",
            "completion_tokens",
            "cost",
            "unpriced_requests",
        )
        table = self.t("usage_daily")
        query = sql.SQL(
            "INSERT INTO {} AS u (day, tenant_id, model, {cols})"
            " SELECT * FROM unnest(%s::date[], %s::text[], %s::text[], {arrays})"
            " ON CONFLICT (day, tenant_id, model) DO UPDATE SET {sets}"
        ).format(
            table,
            cols=sql.SQL(", ").join(map(sql.Identifier, counters)),
            arrays=sql.SQL(", ").join(
                sql.SQL("%s::numeric[]" if c == "cost" else "%s::bigint[]") for c in counters
            ),
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = u.{c} + excluded.{c}").format(c=sql.Identifier(c)) for c in counters
            ),
        )
        await conn.execute(
            query,
            (
                [k[0] for k in keys],
                [k[1] for k in keys],
                [k[2] for k in keys],
                [x.requests for x in d],
                [x.completed for x in d],
                [x.cancelled for x in d],
                [x.failed for x in d],
                [x.prompt_tokens for x in d],
                [x.completion_tokens for x in d],
                [x.cost for x in d],
                [x.unpriced for x in d],
            ),
        )

    async def _write_outbox(self, conn: AsyncConn, rows: list[LedgerRow]) -> list[Settlement]:
        settlements = [
            Settlement(
                request_id=r.bill.request_id,
                tenant_id=r.bill.tenant_id,
                submitted_at_ms=r.bill.submitted_at_ms,
                reserved_tokens=r.bill.reserved_tokens,
                used_tokens=r.bill.used_tokens,
            )
            for r in sorted(rows, key=lambda r: r.bill.request_id)
        ]
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (request_id, tenant_id, submitted_at, reserved_tokens, used_tokens)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::bigint[],"
                " %s::bigint[]) ON CONFLICT DO NOTHING"
            ).format(self.t("quota_outbox")),
            (
                [s.request_id for s in settlements],
                [s.tenant_id for s in settlements],
                [projection.ms_to_dt(s.submitted_at_ms) for s in settlements],
                [s.reserved_tokens for s in settlements],
                [s.used_tokens for s in settlements],
            ),
        )
        return settlements

    async def _store_offsets(
        self, conn: AsyncConn, next_offsets: dict[TopicPartitionKey, int]
    ) -> None:
        keys = sorted(next_offsets)
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (consumer_group, topic, partition, next_offset)"
                " SELECT %s, * FROM unnest(%s::text[], %s::int[], %s::bigint[])"
                " ON CONFLICT (consumer_group, topic, partition)"
                " DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()"
            ).format(self.t("consumer_offsets")),
            (
                self.group,
                [k[0] for k in keys],
                [k[1] for k in keys],
                [next_offsets[k] for k in keys],
            ),
        )

    # -- quota outbox -----------------------------------------------------------------------

    async def pending_settlements(self, conn: AsyncConn, limit: int) -> list[Settlement]:
        """Oldest outbox rows not locked by another aggregator (call inside a transaction)."""
        cur = await conn.execute(
            sql.SQL(
                "SELECT request_id, tenant_id, submitted_at, reserved_tokens, used_tokens FROM {}"
                " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED"
            ).format(self.t("quota_outbox")),
            (limit,),
        )
        return [
            Settlement(rid, tenant, projection.dt_to_ms(at), int(reserved), int(used))
            for rid, tenant, at, reserved, used in await cur.fetchall()
        ]

    async def delete_settled(self, conn: AsyncConn, request_ids: Sequence[str]) -> None:
        await conn.execute(
            sql.SQL("DELETE FROM {} WHERE request_id = ANY(%s::text[])").format(
                self.t("quota_outbox")
            ),
            (list(request_ids),),
        )

    # -- parked terminal requests -------------------------------------------------------------

    async def orphans(
        self, conn: AsyncConn, grace_s: float, limit: int
    ) -> tuple[int, list[tuple[str, Coords | None]]]:
        """Terminal requests still waiting for their submitted event after `grace_s` seconds
        (by wall clock, both since the terminal event and since the row last changed): the
        count, and up to `limit` of them with the record that made them terminal."""
        where = sql.SQL(
            "status IN ('completed', 'cancelled', 'failed') AND NOT billed"
            " AND updated_at < now() - make_interval(secs => %(g)s)"
            " AND coalesce(finished_at, updated_at) < now() - make_interval(secs => %(g)s)"
        )
        table = self.t("requests")
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table, where), {"g": grace_s}
        )
        row = await cur.fetchone()
        total = int(row[0]) if row else 0
        if not total:
            return 0, []
        cur = await conn.execute(
            sql.SQL(
                "SELECT request_id, terminal_topic, terminal_partition, terminal_offset FROM {}"
                " WHERE {} ORDER BY finished_at NULLS FIRST LIMIT %(n)s"
            ).format(table, where),
            {"g": grace_s, "n": limit},
        )
        found = []
        for rid, topic, partition, offset in await cur.fetchall():
            coords = (
                Coords(topic, partition, offset)
                if topic is not None and partition is not None and offset is not None
                else None
            )
            found.append((str(rid), coords))
        return total, found

    # -- rebuilds ----------------------------------------------------------------------------

    async def create_schema_like(self, conn: AsyncConn, live_schema: str) -> None:
        """(Re)create this store's schema with empty copies of the live projection tables."""
        if not self.schema or self.schema == live_schema:
            raise ValueError("a rebuild needs its own schema")
        async with conn.transaction():
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            for name in PROJECTION_TABLES:
                await conn.execute(
                    sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                        self.t(name), sql.Identifier(live_schema, name)
                    )
                )
