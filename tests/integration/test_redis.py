"""Redis is reachable and atomic scripting works (quota reservations rely on Lua)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

pytestmark = pytest.mark.integration


async def test_lua_is_atomic_and_keys_expire(redis_client: aioredis.Redis, key_prefix: str) -> None:
    script = redis_client.register_script(
        "local v = redis.call('INCRBY', KEYS[1], ARGV[1]) "
        "redis.call('PEXPIRE', KEYS[1], ARGV[2]) return v"
    )
    results = [await script(keys=[key_prefix + "n"], args=[5, 60000]) for _ in range(4)]
    assert results == [5, 10, 15, 20]
    ttl = await redis_client.pttl(key_prefix + "n")
    assert 0 < ttl <= 60000
    await redis_client.delete(key_prefix + "n")
