"""Real infrastructure for integration tests, isolated per test session.

- PostgreSQL: a fresh database `llmstream_test_<random>` on the configured server, migrated,
  dropped at the end.
- Kafka: unique topic names per test (`topic_name` fixture), so runs never see each other's
  records.
- Redis: unique key prefixes per test.
A missing component fails with the command to run, instead of hanging.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import make_conninfo

from llmstream import config, migrate
from llmstream_tools import stack
from llmstream_tools.testing.aggregator import Topics, fresh_database, fresh_topics


def _require(what: str, get: object) -> str:
    try:
        value = get() if callable(get) else get
    except config.ConfigError as exc:
        pytest.fail(f"{exc} (`make test` runs `llmstream infra up` first)")
    assert isinstance(value, str)
    return value


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return config.kafka_bootstrap()


@pytest.fixture(scope="session")
def server_database_url() -> str:
    return _require("PostgreSQL", config.database_url)


@pytest.fixture(scope="session")
def database_url(server_database_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session."""
    name = f"llmstream_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_database_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    url = make_conninfo(server_database_url, dbname=name)
    asyncio.run(migrate.apply(url))
    yield url
    with psycopg.connect(server_database_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture
def db_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point LLMSTREAM_DATABASE_URL (in-process and for subprocesses) at the test database."""
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", database_url)
    return database_url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _require("Redis", config.redis_url)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
def key_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def topic_name(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A fresh 3-partition topic; deleted afterwards."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    await stack.create_topics(kafka_bootstrap, {name: 3})
    yield name
    await stack.delete_topics(kafka_bootstrap, [name])


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    """Fresh prompts + tokens (+ DLQ) topics, deleted afterwards."""
    async with fresh_topics(kafka_bootstrap) as t:
        yield t


@pytest.fixture
async def db(server_database_url: str) -> AsyncIterator[str]:
    """A fresh migrated database per test (the aggregator tests need clean projections)."""
    async with fresh_database(server_database_url) as url:
        yield url
