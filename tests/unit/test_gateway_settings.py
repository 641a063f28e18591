"""Gateway settings, auth helpers and quota script arguments (pure parts)."""

from __future__ import annotations

import pytest

from gateway import auth, quota
from gateway.settings import VARIABLES, Settings, parse_partitions, split_partitions
from llmstream import config, quota_keys


def test_parse_partitions() -> None:
    assert parse_partitions("0-2,7, 5") == [0, 1, 2, 5, 7]
    assert parse_partitions("3") == [3]
    for bad in ("a", "3-1", "-1", "1-x"):
        with pytest.raises(ValueError, match="bad partition range"):
            parse_partitions(bad)


def test_split_partitions_covers_each_once() -> None:
    for count in (1, 4, 12, 13):
        for replicas in range(1, count + 1):
            parts = [split_partitions(count, i, replicas) for i in range(replicas)]
            assert sorted(p for ps in parts for p in ps) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        split_partitions(2, 2, 2)
    with pytest.raises(ValueError):
        split_partitions(1, 0, 2)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_REDIS_URL", "redis://x")
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", "postgresql://x")
    monkeypatch.setenv("LLMSTREAM_GATEWAY_PARTITIONS", "0-5")
    monkeypatch.setenv("LLMSTREAM_GATEWAY_ORIGINS", "http://a, http://b")
    s = Settings.from_env()
    assert s.partitions == [0, 1, 2, 3, 4, 5]
    assert s.origins == ["http://a", "http://b"]
    assert s.grace_s == 30 and s.gateway_id.startswith("gateway-")
    monkeypatch.setenv("LLMSTREAM_GATEWAY_PARTITIONS", "x")
    with pytest.raises(config.ConfigError, match="GATEWAY_PARTITIONS"):
        Settings.from_env()


def test_bearer_cookie_origin() -> None:
    assert auth.bearer("Bearer abc") == "abc"
    assert auth.bearer("bearer  abc ") == "abc"
    assert auth.bearer("Basic abc") is None and auth.bearer(None) is None
    assert auth.cookie_value("a=1; llmstream_session=xyz") == "xyz"
    assert auth.cookie_value("a=1") is None
    assert auth.origin_allowed(None, [], "h")
    assert auth.origin_allowed("http://h:8000", [], "h:8000")
    assert not auth.origin_allowed("http://evil", [], "h:8000")
    assert auth.origin_allowed("http://a", ["http://a"], "h")
    assert auth.origin_allowed("http://z", ["*"], "h")
    cookie = auth.set_cookie("sid", 60, secure=True)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie


async def test_key_cache_expires_and_checks_secret() -> None:
    from llmstream import apikeys

    new = apikeys.generate()
    limits = quota.Limits("free", 1, 1, 1, 1, 1, 1)
    rows = {new.key_id: auth.KeyRow(new.key_id, "t1", new.sha256, True, limits)}
    calls: list[str] = []
    now = [0.0]

    async def lookup(key_id: str) -> auth.KeyRow | None:
        calls.append(key_id)
        return rows.get(key_id)

    cache = auth.KeyCache(lookup, 5, clock=lambda: now[0])
    p = await cache.verify_key(new.key)
    assert p is not None and p.tenant_id == "t1"
    assert await cache.verify_key(new.key[:-1] + ("A" if new.key[-1] != "A" else "B")) is None
    assert await cache.verify_key("garbage") is None
    assert calls == [new.key_id]  # cached; malformed keys never looked up
    rows[new.key_id] = auth.KeyRow(new.key_id, "t1", new.sha256, False, limits)
    assert await cache.still_valid(p) is not None  # within the cache period
    now[0] = 6
    assert await cache.still_valid(p) is None


async def test_an_expired_key_is_refused_even_from_the_cache() -> None:
    from llmstream import apikeys

    new = apikeys.generate()
    limits = quota.Limits("free", 1, 1, 1, 1, 1, 1)
    row = auth.KeyRow(new.key_id, "t1", new.sha256, True, limits, expires_at=1000.0)
    lookups: list[str] = []

    async def lookup(key_id: str) -> auth.KeyRow | None:
        lookups.append(key_id)
        return row

    wall = [999.0]
    cache = auth.KeyCache(lookup, 60, clock=lambda: 0.0, wall_clock=lambda: wall[0])
    p = await cache.verify_key(new.key)
    assert p is not None
    wall[0] = 1000.0
    assert await cache.still_valid(p) is None
    assert await cache.verify_key(new.key) is None
    assert lookups == [new.key_id]  # refused from the cached row: no lookup needed


def test_reserve_args_use_shared_key_layout() -> None:
    at = 1_700_000_000_000
    limits = quota.Limits("x", 10, 100, 1000, 2, 50, 4)
    keys = quota.keys("t1", at)
    assert keys == [
        quota_keys.streams("t1"),
        quota_keys.requests_minute("t1", at),
        quota_keys.tokens_day("t1", at),
        quota_keys.tokens_month("t1", at),
        quota_keys.reservations("t1"),
        quota_keys.reserved("t1"),
    ]
    args = quota.reserve_args("r", at, at, 30, limits, 1000)
    assert args[:8] == [at, "r", at + 1000, 30, 2, 10, 100, 1000]
    assert args[11] == quota_keys.minute_start_ms(at) + 60_000
    # The reservation is recorded at the submit time: the reaper and a release find its windows.
    assert args[14:] == [at, quota_keys.RESERVATIONS_TTL_MS]


def test_in_process_defaults_are_the_documented_ones() -> None:
    documented = {s.name: s.default for s in config.SETTINGS}
    s = Settings()
    for field_name, variable in VARIABLES.items():
        value = getattr(s, field_name)
        raw = documented[variable]
        expected = config.parse_bool(raw, variable) if isinstance(value, bool) else type(value)(raw)
        assert value == expected, field_name


def test_cookie_secure_is_a_strict_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_REDIS_URL", "redis://x")
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", "postgresql://x")
    for raw, expected in (("true", True), ("1", True), ("Yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("LLMSTREAM_GATEWAY_COOKIE_SECURE", raw)
        assert Settings.from_env().cookie_secure is expected
    monkeypatch.setenv("LLMSTREAM_GATEWAY_COOKIE_SECURE", "ture")
    with pytest.raises(config.ConfigError, match="GATEWAY_COOKIE_SECURE='ture' is not a boolean"):
        Settings.from_env()
    monkeypatch.setenv("LLMSTREAM_GATEWAY_COOKIE_SECURE", "1")
    monkeypatch.setenv("LLMSTREAM_GATEWAY_GRACE_S", "2.5")
    assert Settings.from_env().grace_s == 2.5


def test_owned_partitions() -> None:
    assert Settings(partitions=[5, 1, 9]).owned_partitions(8) == [1, 5]
    assert Settings(replica_index=1, replicas=2).owned_partitions(4) == [2, 3]
    with pytest.raises(RuntimeError, match="no partitions"):
        Settings(partitions=[9]).owned_partitions(4)
