"""`llmstream tenants ...` and `llmstream keys ...`: tenant and API key administration."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Sequence

import psycopg

from llmstream import apikeys, config


class AdminError(RuntimeError):
    pass


async def _connect(database_url: str | None = None) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(
        database_url or config.database_url(), connect_timeout=10
    )


async def create_tenant(name: str, tier: str, database_url: str | None = None) -> str:
    async with await _connect(database_url) as conn:
        try:
            cur = await conn.execute(
                "INSERT INTO tenants (id, name, tier) VALUES (%s, %s, %s) RETURNING id",
                (f"t_{uuid.uuid4().hex[:16]}", name, tier),
            )
        except psycopg.errors.UniqueViolation:
            raise AdminError(f"tenant {name!r} already exists") from None
        except psycopg.errors.ForeignKeyViolation:
            raise AdminError(f"unknown tier {tier!r} (see `llmstream tenants tiers`)") from None
        except psycopg.errors.CheckViolation:
            raise AdminError(
                f"invalid tenant name {name!r}: use lowercase letters, digits, '-' or '_'"
            ) from None
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


async def create_key(
    tenant_name: str, database_url: str | None = None, expires_in_s: float | None = None
) -> apikeys.NewKey:
    """A new key of the tenant; with `expires_in_s`, refused from that many seconds on."""
    if expires_in_s is not None and expires_in_s <= 0:
        raise AdminError("the expiry must be in the future")
    new = apikeys.generate()
    async with await _connect(database_url) as conn:
        cur = await conn.execute("SELECT id FROM tenants WHERE name = %s", (tenant_name,))
        row = await cur.fetchone()
        if row is None:
            raise AdminError(f"no tenant named {tenant_name!r}")
        await conn.execute(
            "INSERT INTO api_keys (id, tenant_id, key_sha256, expires_at) VALUES"
            " (%s, %s, %s, now() + make_interval(secs => %s))",
            (new.key_id, row[0], new.sha256, expires_in_s),
        )
    return new


async def revoke_key(key_or_id: str) -> None:
    key_id = apikeys.key_id_of(key_or_id) or key_or_id
    async with await _connect() as conn:
        cur = await conn.execute(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s",
            (key_id,),
        )
        if cur.rowcount == 0:
            raise AdminError(f"no API key with id {key_id!r}")


async def key_is_active(key: str) -> bool:
    key_id = apikeys.key_id_of(key)
    if key_id is None:
        return False
    async with await _connect() as conn:
        cur = await conn.execute(
            "SELECT key_sha256 FROM api_keys WHERE id = %s AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())",
            (key_id,),
        )
        row = await cur.fetchone()
    return row is not None and isinstance(row[0], bytes) and apikeys.matches(key, row[0])


async def list_rows(query: str) -> list[tuple[object, ...]]:
    async with await _connect() as conn:
        cur = await conn.execute(query.encode())
        return await cur.fetchall()


def _print_rows(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = [list(header)] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """`90s`, `30m`, `12h`, `30d` (or plain seconds) -> seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (examples: 90s, 30m, 12h, 30d)"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmstream")
    sub = parser.add_subparsers(dest="group", required=True)
    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True
    )
    create = tenants.add_parser("create", help="create a tenant")
    create.add_argument("name")
    create.add_argument("--tier", default="standard", help="quota tier (default: standard)")
    tenants.add_parser("list", help="list tenants")
    tenants.add_parser("tiers", help="list quota tiers")
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    kc = keys.add_parser("create", help="create an API key (printed once)")
    kc.add_argument("--tenant", required=True, help="tenant name")
    kc.add_argument(
        "--expires-in",
        type=duration_s,
        metavar="DURATION",
        help="refuse the key after this long: 90s, 30m, 12h, 30d (default: never expires)",
    )
    kr = keys.add_parser("revoke", help="revoke an API key")
    kr.add_argument("key", help="the key, or its id (the part after lsk_)")
    keys.add_parser("list", help="list API keys (ids only)")
    return parser


async def _run(args: argparse.Namespace) -> int:
    if args.group == "tenants":
        if args.action == "create":
            tenant_id = await create_tenant(args.name, args.tier)
            print(f"created tenant {args.name} ({tenant_id}, tier {args.tier})")
        elif args.action == "list":
            rows = await list_rows(
                "SELECT name, id, tier, created_at, disabled_at FROM tenants ORDER BY name"
            )
            _print_rows(("NAME", "ID", "TIER", "CREATED", "DISABLED"), rows)
        else:
            rows = await list_rows("SELECT * FROM quota_tiers ORDER BY requests_per_minute")
            _print_rows(
                ("TIER", "RPM", "TOKENS/DAY", "TOKENS/MONTH", "STREAMS", "MAX_TOKENS", "SOCKETS"),
                rows,
            )
    elif args.action == "create":
        new = await create_key(args.tenant, expires_in_s=args.expires_in)
        print(new.key)
        print(f"key id {new.key_id}: store the key now, it is not shown again", file=sys.stderr)
    elif args.action == "revoke":
        await revoke_key(args.key)
        print("revoked")
    else:
        rows = await list_rows(
            "SELECT k.id, t.name, k.created_at, k.expires_at, k.revoked_at FROM api_keys k"
            " JOIN tenants t ON t.id = k.tenant_id ORDER BY t.name, k.created_at"
        )
        _print_rows(("KEY ID", "TENANT", "CREATED", "EXPIRES", "REVOKED"), rows)
    return 0


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        return asyncio.run(_run(args))
    except (AdminError, config.ConfigError) as exc:
        print(f"llmstream {args.group}: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"llmstream {args.group}: PostgreSQL unreachable: {exc}".strip(), file=sys.stderr)
        return 1
