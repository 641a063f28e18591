"""Configuration: documented defaults, README kept in sync, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstream import config
from llmstream_tools import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_variable() -> None:
    assert config.readme_table(README.read_text()) == config.markdown_table(), (
        "README's configuration table is stale: run `make readme-config`"
    )


def test_every_setting_is_documented() -> None:
    names = [s.name for s in config.SETTINGS]
    assert len(names) == len(set(names))
    assert all(s.help.endswith(".") for s in config.SETTINGS)


def test_bad_integer_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_GATEWAY_PORT", "eighty")
    with pytest.raises(config.ConfigError, match="LLMSTREAM_GATEWAY_PORT='eighty'"):
        config.get_int("GATEWAY_PORT")


def test_missing_database_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMSTREAM_DATABASE_URL", raising=False)
    monkeypatch.setenv("LLMSTREAM_STATE_DIR", str(tmp_path))
    with pytest.raises(config.ConfigError, match="llmstream infra up"):
        config.database_url()


def test_infra_record_supplies_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMSTREAM_REDIS_URL", raising=False)
    monkeypatch.setenv("LLMSTREAM_STATE_DIR", str(tmp_path))
    (tmp_path / "infra.json").write_text('{"redis_url": "redis://127.0.0.1:7/0"}')
    assert config.redis_url() == "redis://127.0.0.1:7/0"


# ---- credentials: whose, and from where --------------------------------------------------------

RECORD = {
    "redis_url": "redis://admin:a@127.0.0.1:7/0",
    "redis_urls": {
        "admin": "redis://admin:a@127.0.0.1:7/0",
        "gateway": "redis://gateway:g@127.0.0.1:7/0",
    },
    "kafka_security_protocol": "SASL_PLAINTEXT",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_users": {"admin": "ka", "gateway": "kg", "worker": "kw"},
}
CREDENTIALS = ("PRINCIPAL", "KAFKA_USERNAME", "KAFKA_PASSWORD", "KAFKA_SECURITY_PROTOCOL")


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (*CREDENTIALS, "REDIS_URL", "KAFKA_SASL_MECHANISM"):
        monkeypatch.delenv(config.PREFIX + name, raising=False)
    monkeypatch.setattr(config, "_declared", [])
    monkeypatch.setenv("LLMSTREAM_STATE_DIR", str(tmp_path))
    (tmp_path / "infra.json").write_text(json.dumps(RECORD))
    return tmp_path


def test_tooling_is_admin_a_declared_service_itself_and_the_variable_wins(
    record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config.principal() == "admin"
    assert config.kafka_auth() == config.KafkaAuth("SASL_PLAINTEXT", "SCRAM-SHA-512", "admin", "ka")
    with config.acting_as("worker"):
        assert config.kafka_auth().username == "worker"
        monkeypatch.setenv("LLMSTREAM_PRINCIPAL", "gateway")
        assert config.kafka_auth().username == "gateway"
    assert config.principal() == "gateway"
    monkeypatch.delenv("LLMSTREAM_PRINCIPAL")
    assert config.principal() == "admin"
    monkeypatch.setenv("LLMSTREAM_PRINCIPAL", "gateway")
    assert config.kafka_auth() == config.KafkaAuth(
        "SASL_PLAINTEXT", "SCRAM-SHA-512", "gateway", "kg"
    )
    assert config.redis_url() == "redis://gateway:g@127.0.0.1:7/0"
    assert config.redis_url("admin") == RECORD["redis_url"]


def test_a_principal_without_a_user_is_a_clear_error(record: Path) -> None:
    with pytest.raises(config.ConfigError, match="no user for principal 'model-server'"):
        config.kafka_auth("model-server")
    with pytest.raises(config.ConfigError, match=r"no user for principal 'worker'.*admin, gateway"):
        config.redis_url("worker")


def test_explicit_credentials_override_the_record(
    record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSTREAM_KAFKA_USERNAME", "svc")
    with pytest.raises(config.ConfigError, match="LLMSTREAM_KAFKA_USERNAME=svc is set but no"):
        config.kafka_auth()
    monkeypatch.setenv("LLMSTREAM_KAFKA_PASSWORD", "pw")
    monkeypatch.setenv("LLMSTREAM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    assert config.kafka_auth("gateway") == config.KafkaAuth(
        "SASL_PLAINTEXT", "SCRAM-SHA-256", "svc", "pw"
    )
    monkeypatch.setenv("LLMSTREAM_KAFKA_SECURITY_PROTOCOL", "ssl")
    with pytest.raises(config.ConfigError, match="is not one of PLAINTEXT, SASL_PLAINTEXT"):
        config.kafka_auth()


def test_no_credentials_anywhere_is_plaintext(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An infra started before authentication (or an external cluster without it)."""
    for name in CREDENTIALS:
        monkeypatch.delenv(config.PREFIX + name, raising=False)
    monkeypatch.setenv("LLMSTREAM_STATE_DIR", str(tmp_path))
    (tmp_path / "infra.json").write_text('{"kafka_users": {}, "redis_url": "redis://h:7/0"}')
    assert config.kafka_auth() == config.KafkaAuth()
    assert config.redis_url() == "redis://h:7/0"
    monkeypatch.setenv("LLMSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(config.ConfigError, match="needs LLMSTREAM_KAFKA_USERNAME"):
        config.kafka_auth()


def test_a_service_command_acts_as_its_service_only_while_it_runs(record: Path) -> None:
    """`llmstream worker --help` in a test process leaves the process the tooling's admin."""
    with pytest.raises(SystemExit):
        cli.main(["worker", "--help"])
    assert config.principal() == "admin"
