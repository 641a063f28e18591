"""Migrations on a real PostgreSQL: applied once, re-runnable, edits detected."""

from __future__ import annotations

import psycopg
import pytest

from llmstream import migrate

pytestmark = pytest.mark.integration


async def test_rerun_applies_nothing(database_url: str) -> None:
    assert await migrate.apply(database_url) == []
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        versions = [r[0] for r in await cur.fetchall()]
    assert versions == [m.version for m in migrate.available()]


async def test_edited_migration_is_refused(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = migrate.available()[0]
    edited = migrate.Migration(first.version, first.sql + "\n-- edited\n")
    monkeypatch.setattr(migrate, "available", lambda: [edited])
    with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
        await migrate.apply(database_url)
