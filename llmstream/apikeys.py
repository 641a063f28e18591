"""API key format: `lsk_<id>_<secret>`.

`id` (12 chars) is public and indexes the row; `secret` is 256 random bits. The database keeps
only SHA-256 of the whole key, so a leaked table does not leak keys, and a lookup is one
primary-key read plus a constant-time compare.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_FORMAT = re.compile(r"^lsk_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str  # shown once, never stored
    sha256: bytes


def generate() -> NewKey:
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    key = f"lsk_{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id, key, digest(key))


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None (malformed keys never reach the database)."""
    match = _FORMAT.match(key)
    return match.group(1) if match else None


def matches(key: str, stored_sha256: bytes) -> bool:
    return hmac.compare_digest(digest(key), stored_sha256)
