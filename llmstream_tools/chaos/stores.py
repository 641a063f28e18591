"""What the stores hold for one tenant, for the billing verdict (`check.judge_tenant`): its ledger
rows by request and `usage_daily` from PostgreSQL, its quota counters, settled set and open
stream slots from Redis."""

from __future__ import annotations

import time

import psycopg
import redis.asyncio as aioredis

from llmstream import config, quota_keys
from llmstream_tools.chaos import check


async def ledger(
    database_url: str, tenant_id: str
) -> tuple[dict[str, check.LedgerRow], tuple[int, int]]:
    """The tenant's ledger rows by request, and its usage_daily (requests, tokens)."""
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=10) as conn:
        cur = await conn.execute(
            "SELECT request_id, count(*), sum(prompt_tokens), sum(completion_tokens)"
            " FROM usage_ledger WHERE tenant_id = %s GROUP BY request_id",
            (tenant_id,),
        )
        ledger = dict(check.ledger_by_request(await cur.fetchall()))
        cur = await conn.execute(
            "SELECT coalesce(sum(requests), 0), coalesce(sum(prompt_tokens + completion_tokens), 0)"
            " FROM usage_daily WHERE tenant_id = %s",
            (tenant_id,),
        )
        row = await cur.fetchone()
        assert row is not None
    return ledger, (int(row[0]), int(row[1]))


async def tenant_billing(
    tenant_id: str, ledger: dict[str, check.LedgerRow], daily: tuple[int, int]
) -> check.TenantBilling:
    now_ms = int(time.time() * 1000)
    rc = aioredis.from_url(config.redis_url(), socket_timeout=5, socket_connect_timeout=5)
    try:
        day = int(await rc.get(quota_keys.tokens_day(tenant_id, now_ms)) or 0)
        month = int(await rc.get(quota_keys.tokens_month(tenant_id, now_ms)) or 0)
        settled = int(await rc.scard(quota_keys.settled(tenant_id, now_ms)))
        open_streams = int(await rc.zcard(quota_keys.streams(tenant_id)))
    finally:
        await rc.aclose()
    return check.TenantBilling(
        ledger_rows=sum(r.rows for r in ledger.values()),
        ledger_tokens=sum(r.prompt_tokens + r.completion_tokens for r in ledger.values()),
        daily_requests=daily[0],
        daily_tokens=daily[1],
        redis_day=day,
        redis_month=month,
        settled=settled,
        open_streams=open_streams,
        duplicate_bill_counter=0,
    )
