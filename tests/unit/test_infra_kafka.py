"""Pure parts of the local Kafka set-up."""

from __future__ import annotations

import uuid

import pytest

from llmstream_tools.infra import _kafka_setup


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """0xF8... encodes to "-..." in URL-safe base64: the storage tool would take it for an
    option ("argument --cluster-id/-t: expected one argument"), so it is drawn again."""
    draws = iter([uuid.UUID(bytes=b"\xf8" + b"\x00" * 15), uuid.UUID(bytes=b"\x10" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    assert _kafka_setup.new_cluster_id() == "EBAQEBAQEBAQEBAQEBAQEA"
