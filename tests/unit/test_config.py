"""Configuration: documented defaults, README kept in sync, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstream import config

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
