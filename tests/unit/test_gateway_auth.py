"""Pure parts of gateway authentication: the signed session value (HMAC under the server's
secrets, bound to its Redis key, absolute lifetime), the session secret file, and the bounded
negative cache of unusable API keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway import auth
from gateway.quota import Limits
from llmstream import apikeys

SECRET = b"a" * 32
OLD = b"b" * 32
KEY = "gw:session:abc"
HOUR_MS = 3600_000


def sealed(secret: bytes = SECRET, created: int = 1000, key: str = KEY) -> str:
    return auth.seal_session(secret, key, auth.SessionValue("k1", "t1", created))


def test_a_sealed_session_opens_with_its_secret_until_its_absolute_end() -> None:
    value = auth.open_session([SECRET], KEY, sealed(), 2000, HOUR_MS)
    assert value == auth.SessionValue("k1", "t1", 1000)
    assert auth.open_session([SECRET], KEY, sealed(), 1000 + HOUR_MS - 1, HOUR_MS) is not None
    assert auth.open_session([SECRET], KEY, sealed(), 1000 + HOUR_MS, HOUR_MS) is None
    assert auth.open_session([SECRET], KEY, sealed(), 999, HOUR_MS) is None  # from the future


def test_forged_moved_or_tampered_values_are_refused() -> None:
    # The old plain format "key_id tenant_id" (what anyone able to write Redis could set).
    assert auth.open_session([SECRET], KEY, "k1 t1", 2000, HOUR_MS) is None
    # Signed with another secret, or copied under another session's key.
    assert auth.open_session([SECRET], KEY, sealed(OLD), 2000, HOUR_MS) is None
    assert auth.open_session([SECRET], "gw:session:other", sealed(), 2000, HOUR_MS) is None
    # Another tenant or a later creation time with the same MAC.
    k, _t, created, mac = sealed().split(" ")
    assert auth.open_session([SECRET], KEY, f"{k} t2 {created} {mac}", 2000, HOUR_MS) is None
    assert auth.open_session([SECRET], KEY, f"{k} t1 1500 {mac}", 2000, HOUR_MS) is None


def test_rotation_verifies_with_every_secret_of_the_file() -> None:
    # The new secret first (it signs); sessions signed with the old one still open.
    assert auth.open_session([SECRET, OLD], KEY, sealed(OLD), 2000, HOUR_MS) is not None


def test_the_secret_file_is_created_once_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "session-secret"
    first = auth.read_secrets(path)
    assert len(first) == 1 and len(first[0]) == 2 * auth.SECRET_BYTES
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert auth.read_secrets(path) == first  # another replica reads the same
    assert [p.name for p in path.parent.iterdir()] == ["session-secret"]  # no temp file left
    path.write_text("short\n")
    with pytest.raises(auth.SessionSecretError, match=r"line\(s\) \[1\] shorter than 32"):
        auth.read_secrets(path)


def test_sliding_ttl_is_cut_at_the_absolute_end() -> None:
    s = auth.Sessions(None, ttl_s=3600, secrets_=[SECRET], max_s=7200)  # type: ignore[arg-type]
    assert s.ttl_at(0, 0) == 3600
    assert s.ttl_at(0, 7200_000 - 60_000) == 60
    assert s.ttl_at(0, 7200_000) == 1


async def test_unusable_keys_are_remembered_by_hash_within_a_bound() -> None:
    good = apikeys.generate()
    limits = Limits("free", 1, 1, 1, 1, 1, 1)
    lookups: list[str] = []

    async def lookup(key_id: str) -> auth.KeyRow | None:
        lookups.append(key_id)
        if key_id == good.key_id:
            return auth.KeyRow(good.key_id, "t1", good.sha256, True, limits)
        return None

    now = [0.0]
    negative = auth.NegativeCache(30.0, size=2, clock=lambda: now[0])
    cache = auth.KeyCache(lookup, 5, clock=lambda: now[0], negative=negative)
    unknown = [apikeys.generate().key for _ in range(3)]
    assert await cache.verify_key(unknown[0]) is None
    assert await cache.verify_key(unknown[0]) is None
    assert len(lookups) == 1  # the second try costs no query
    assert all(unknown[0] not in repr(k) for k in negative._refused)  # only its hash is kept
    # A wrong secret for a real key id is remembered too; the real key still works.
    wrong = good.key[:-4] + ("AAAA" if not good.key.endswith("AAAA") else "BBBB")
    assert await cache.verify_key(wrong) is None and negative.refused(wrong)
    assert await cache.verify_key(good.key) is not None
    # Bounded: the oldest entry goes first; and entries expire.
    for k in unknown[1:]:
        assert await cache.verify_key(k) is None
    assert len(negative._refused) == 2 and not negative.refused(unknown[0])
    now[0] = 31.0
    assert not negative.refused(unknown[2])
