"""PostgreSQL schema migrations: ordered, versioned, re-runnable.

Files `llmstream/migrations/NNNN_name.sql` are applied in order, each in its own transaction,
and recorded in `schema_migrations` with a checksum. Re-running applies only new files; an
applied file whose content changed is an error (write a new migration instead). A
transaction-level advisory lock makes concurrent runners (several services starting at once)
safe.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

_LOCK_ID = 0x6C6C6D73  # "llms"


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    folder = resources.files("llmstream") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [Migration(p.name.removesuffix(".sql"), p.read_text()) for p in files]


async def apply(database_url: str, timeout_s: float = 10.0) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now: list[str] = []
    async with await psycopg.AsyncConnection.connect(
        database_url, connect_timeout=int(timeout_s), autocommit=True
    ) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in available():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
                cur = await conn.execute(
                    "SELECT checksum FROM schema_migrations WHERE version = %s",
                    (migration.version,),
                )
                row = await cur.fetchone()
                if row is not None:
                    if row[0] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version} was changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                    (migration.version, migration.checksum),
                )
                applied_now.append(migration.version)
                log.info("applied migration %s", migration.version)
    return applied_now
