"""`llmstream tenants` / `llmstream keys` against a real PostgreSQL, through the CLI."""

from __future__ import annotations

import subprocess
import uuid

import psycopg
import pytest

from llmstream import apikeys

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["llmstream", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_tenant_key_lifecycle(db_env: str) -> None:
    name = f"acme-{uuid.uuid4().hex[:6]}"
    created = cli("tenants", "create", name, "--tier", "free")
    assert created.returncode == 0, created.stderr
    assert name in created.stdout

    again = cli("tenants", "create", name)
    assert again.returncode == 1
    assert "already exists" in again.stderr

    key_run = cli("keys", "create", "--tenant", name)
    assert key_run.returncode == 0, key_run.stderr
    key = key_run.stdout.strip()
    key_id = apikeys.key_id_of(key)
    assert key_id is not None
    with psycopg.connect(db_env) as conn:
        row = conn.execute(
            "SELECT key_sha256, revoked_at FROM api_keys WHERE id = %s", (key_id,)
        ).fetchone()
    assert row is not None
    stored_hash, revoked_at = row
    assert bytes(stored_hash) == apikeys.digest(key)
    assert key.encode() != bytes(stored_hash)  # never stored in clear
    assert revoked_at is None

    listed = cli("keys", "list")
    assert key_id in listed.stdout and key not in listed.stdout

    assert cli("keys", "revoke", key).returncode == 0
    with psycopg.connect(db_env) as conn:
        row = conn.execute("SELECT revoked_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()
    assert row is not None and row[0] is not None


def test_a_key_can_be_made_to_expire(db_env: str) -> None:
    name = f"exp-{uuid.uuid4().hex[:6]}"
    assert cli("tenants", "create", name).returncode == 0
    run = cli("keys", "create", "--tenant", name, "--expires-in", "12h")
    assert run.returncode == 0, run.stderr
    key_id = apikeys.key_id_of(run.stdout.strip())
    with psycopg.connect(db_env) as conn:
        row = conn.execute(
            "SELECT expires_at - created_at FROM api_keys WHERE id = %s", (key_id,)
        ).fetchone()
    assert row is not None and abs(row[0].total_seconds() - 12 * 3600) < 60
    listed = cli("keys", "list")
    assert "EXPIRES" in listed.stdout.splitlines()[0]
    bad = cli("keys", "create", "--tenant", name, "--expires-in", "soon")
    assert bad.returncode == 2
    assert "not a duration: 'soon'" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_input_is_one_clear_line(db_env: str) -> None:
    unknown_tier = cli("tenants", "create", "x-tier", "--tier", "platinum")
    assert unknown_tier.returncode == 1
    assert "unknown tier 'platinum'" in unknown_tier.stderr
    bad_name = cli("tenants", "create", "Bad Name!")
    assert "invalid tenant name" in bad_name.stderr
    no_tenant = cli("keys", "create", "--tenant", "nobody-here")
    assert "no tenant named 'nobody-here'" in no_tenant.stderr
    assert "Traceback" not in unknown_tier.stderr + bad_name.stderr + no_tenant.stderr


def test_unreachable_database_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    run = cli("tenants", "list")
    assert run.returncode == 1
    assert "PostgreSQL unreachable" in run.stderr
    assert "Traceback" not in run.stderr
