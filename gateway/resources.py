"""Every client the gateway holds, made together in `Resources.open` and closed together.

Kafka clients come from llmstream/kafka.py (one place for bootstrap, timeouts and measured
settings); Redis and PostgreSQL pools are sized and made resilient here. If one client fails to
start, the ones already started are closed again before the error propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from psycopg_pool import AsyncConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from gateway import auth
from gateway.quota import Quota
from gateway.settings import Settings
from gateway.store import RequestStore
from llmstream import kafka

POOL_OPEN_TIMEOUT_S = 15.0


def _redis(url: str) -> aioredis.Redis:
    # A blocking pool: under a burst (hundreds of upgrades at once) callers wait up to 5 s for
    # one of a bounded number of connections instead of failing with "Too many connections".
    return aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=5,
            socket_timeout=5,
            socket_connect_timeout=5,
            # A pool given explicitly gets no retries by default: after a Redis restart every
            # pooled connection would fail one command (HTTP 500 upgrades). Retried on a new
            # connection instead; not after a timeout (the command may have run).
            retry=Retry(
                ExponentialBackoff(cap=1.0, base=0.05),
                3,
                supported_errors=(aioredis.ConnectionError,),
            ),
        )
    )


def _postgres(url: str) -> AsyncConnectionPool:
    # check: a pooled connection is tested before use, so the first key lookups after a
    # PostgreSQL restart get a fresh connection instead of failing (HTTP 500 upgrades).
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=4,
        open=False,
        kwargs={"autocommit": True},
        check=AsyncConnectionPool.check_connection,
    )


@dataclass
class Resources:
    connection: kafka.Connection
    redis: aioredis.Redis
    postgres: AsyncConnectionPool
    producer: AIOKafkaProducer  # prompts (idempotent, acks=all)
    owned_reader: AIOKafkaConsumer  # this replica's tokens partitions
    borrow_reader: AIOKafkaConsumer  # other replicas' partitions, for resumed requests
    # Only with LLMSTREAM_GATEWAY_MAX_PROMPT_LAG: reads the workers' committed offsets.
    admin: AIOKafkaAdminClient | None
    quota: Quota
    store: RequestStore
    auth: auth.Authenticator  # keys (PostgreSQL) and browser sessions (Redis)
    _closing: contextlib.AsyncExitStack

    @classmethod
    async def open(cls, s: Settings) -> Resources:
        conn = kafka.Connection(s.bootstrap)
        async with contextlib.AsyncExitStack() as stack:
            redis = _redis(s.redis_url)
            stack.push_async_callback(redis.aclose)
            postgres = _postgres(s.database_url)
            await postgres.open(wait=True, timeout=POOL_OPEN_TIMEOUT_S)
            stack.push_async_callback(postgres.close)
            producer = kafka.event_producer(conn, s.gateway_id)
            await producer.start()
            stack.push_async_callback(producer.stop)
            # A long poll over fixed partitions: the broker answers as soon as an event
            # arrives, so this only bounds empty fetches (10 ms cost 5% of a core idle).
            owned = kafka.reader(
                conn, s.gateway_id, fetch_max_wait_ms=100, auto_offset_reset="latest"
            )
            await owned.start()
            stack.push_async_callback(owned.stop)
            borrow = kafka.reader(
                conn, f"{s.gateway_id}-borrow", fetch_max_wait_ms=10, auto_offset_reset="latest"
            )
            await borrow.start()
            stack.push_async_callback(borrow.stop)
            admin = None
            if s.max_prompt_lag > 0:
                admin = kafka.admin(conn, f"{s.gateway_id}-admin")
                await admin.start()
                stack.push_async_callback(admin.close)
            # Read (or created) off the loop: a file, at start only.
            session_secrets = await asyncio.to_thread(auth.read_secrets, s.session_secret_path())
            sessions = auth.Sessions(redis, s.session_ttl_s, session_secrets, s.session_max_s)
            keys = auth.KeyCache(auth.pg_lookup(postgres), s.auth_cache_s)
            resources = cls(
                connection=conn,
                redis=redis,
                postgres=postgres,
                producer=producer,
                owned_reader=owned,
                borrow_reader=borrow,
                admin=admin,
                quota=Quota(redis),
                store=RequestStore(redis),
                auth=auth.Authenticator(keys, sessions),
                _closing=stack.pop_all(),
            )
        return resources

    async def close(self) -> None:
        """Close every client, the last made first."""
        await self._closing.aclose()
