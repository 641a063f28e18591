"""The runtime core's small pure parts: strict booleans, dead-letter headers, shutdown signals,
loop supervision."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmstream import config, kafka
from llmstream.runner import Shutdown
from llmstream.supervisor import Supervisor


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", " yes ", "on"])
def test_parse_bool_true(raw: str) -> None:
    assert config.parse_bool(raw, "X") is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "off", ""])
def test_parse_bool_false(raw: str) -> None:
    assert config.parse_bool(raw, "X") is False


@pytest.mark.parametrize("raw", ["ture", "2", "enabled", "y"])
def test_parse_bool_refuses_typos(raw: str) -> None:
    with pytest.raises(config.ConfigError, match="not a boolean"):
        config.parse_bool(raw, "LLMSTREAM_X")


def test_get_bool_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_STORE_TEXT", "treu")
    with pytest.raises(config.ConfigError, match="LLMSTREAM_STORE_TEXT='treu'"):
        config.get_bool("STORE_TEXT")


@dataclass
class _Record:
    topic: str = "llmstream.prompts"
    partition: int = 3
    offset: int = 42
    key: bytes = b"r1"
    value: bytes = b"\x00"
    headers: tuple[tuple[str, bytes], ...] = (("traceparent", b"00-abc"),)


def test_dead_letter_headers_keep_the_originals_then_say_why_where_who() -> None:
    headers = kafka.dead_letter_headers(_Record(), "undecodable: truncated", "worker-1")
    assert headers == [
        ("traceparent", b"00-abc"),
        ("dlq-reason", b"undecodable: truncated"),
        ("dlq-source", b"llmstream.prompts/3@42"),
        ("dlq-by", b"worker-1"),
    ]


def test_partition_range_empty() -> None:
    tp = object()
    assert kafka.PartitionRange(tp, 5, 5).empty
    assert not kafka.PartitionRange(tp, 5, 6).empty
    assert not kafka.PartitionRange(tp, 5, None).empty


async def test_shutdown_first_signal_drains_second_forces() -> None:
    shutdown = Shutdown()
    shutdown.signal(signal.SIGTERM)
    assert shutdown.requested.is_set() and not shutdown.forced.is_set()
    shutdown.signal(signal.SIGINT)
    assert shutdown.forced.is_set()


async def test_supervisor_reports_a_loop_that_dies(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor("worker")

    async def commits() -> None:
        raise RuntimeError("broker gone")

    with caplog.at_level(logging.ERROR, "llmstream.supervisor"):
        sup.spawn(commits(), "commit-loop")
        await asyncio.wait_for(sup.failed.wait(), 5)
    assert not sup.healthy
    assert sup.failures == ["commit-loop: RuntimeError: broker gone"]
    assert "commit-loop died" in caplog.text


async def test_supervisor_a_loop_that_returns_is_a_failure() -> None:
    sup = Supervisor("gateway")

    async def ends() -> None:
        return None

    sup.spawn(ends(), "feed")
    await asyncio.wait_for(sup.failed.wait(), 5)
    assert sup.failures == ["feed: returned"]


async def test_supervisor_stop_cancels_quietly() -> None:
    sup = Supervisor("aggregator")
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = sup.spawn(forever(), "sweep")
    await started.wait()
    await sup.stop()
    assert task.cancelled() and sup.healthy and not sup.tasks


def test_connection_gives_every_client_the_sasl_credentials() -> None:
    auth = config.KafkaAuth("SASL_PLAINTEXT", "SCRAM-SHA-512", "worker", "pw")
    conn = kafka.Connection("b:9092", auth)
    assert conn.client_kwargs("w-1") == {
        "bootstrap_servers": "b:9092",
        "client_id": "w-1",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
        "sasl_plain_password": "pw",
    }
    assert "pw" not in repr(conn)
    plaintext = kafka.Connection("b:9092", config.KafkaAuth())
    assert plaintext.client_kwargs("g") == {"bootstrap_servers": "b:9092", "client_id": "g"}


def test_connection_from_env_authenticates_as_the_principal_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("PRINCIPAL", "KAFKA_USERNAME", "KAFKA_PASSWORD", "KAFKA_SECURITY_PROTOCOL"):
        monkeypatch.delenv(config.PREFIX + name, raising=False)
    monkeypatch.setenv("LLMSTREAM_STATE_DIR", str(tmp_path))
    (tmp_path / "infra.json").write_text(
        json.dumps(
            {"kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_users": {"admin": "a", "gateway": "g"}}
        )
    )
    assert kafka.Connection.from_env("gateway", "h:1").auth.username == "gateway"
    # Made with only the bootstrap: this process's own principal (tooling: admin).
    assert kafka.Connection("h:1").auth.username == "admin"
    monkeypatch.setenv("LLMSTREAM_PRINCIPAL", "gateway")
    assert kafka.Connection("h:1").security_kwargs()["sasl_plain_password"] == "g"
