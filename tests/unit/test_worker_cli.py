"""`llmstream worker` flags and settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import cli


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("LLMSTREAM_MODEL_SERVERS", "a:1, b:2,")
    monkeypatch.setenv("LLMSTREAM_WORKER_MAX_INFLIGHT", "7")
    monkeypatch.setenv("LLMSTREAM_TOPIC_TOKENS", "toks")
    monkeypatch.setenv("LLMSTREAM_WORKER_BLOCKLIST", "x,y")
    s = cli.settings_from(cli.parser().parse_args(["--id", "w9", "--coalesce-ms", "0"]))
    assert s.model_servers == ["a:1", "b:2"]
    assert s.max_inflight == 7 and s.tokens_topic == "toks" and s.worker_id == "w9"
    assert s.coalesce_ms == 0.0 and s.blocklist == "x,y"
    assert cli.settings_from(cli.parser().parse_args([])).worker_id.startswith("worker-")


def test_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--model-servers", " , "]) == 2
    assert "no model servers" in capsys.readouterr().err
    assert cli.main(["--max-inflight", "0"]) == 2


def test_a_malformed_variable_is_one_line_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMSTREAM_WORKER_COALESCE_MS", "5ms")
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err == "llmstream worker: LLMSTREAM_WORKER_COALESCE_MS='5ms' is not a number\n"


def test_tier_check_on_by_default_and_needs_postgres(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("LLMSTREAM_WORKER_TIER_STALE_S", "60")
    s = cli.settings_from(cli.parser().parse_args(["--tier-cache-s", "5"]))
    assert (s.tier_check, s.database_url, s.tier_cache_s, s.tier_stale_s) == (
        True,
        "postgresql://db/x",
        5.0,
        60.0,
    )
    off = cli.settings_from(cli.parser().parse_args(["--no-tier-check"]))
    assert (off.tier_check, off.database_url) == (False, "")
    monkeypatch.setenv("LLMSTREAM_WORKER_TIER_CHECK", "0")
    assert not cli.settings_from(cli.parser().parse_args([])).tier_check
    # On, without any PostgreSQL: a configuration error naming what to do.
    monkeypatch.delenv("LLMSTREAM_WORKER_TIER_CHECK")
    monkeypatch.delenv("LLMSTREAM_DATABASE_URL")
    monkeypatch.setenv("LLMSTREAM_STATE_DIR", str(tmp_path))
    assert cli.main([]) == 2
    assert "no PostgreSQL: set LLMSTREAM_DATABASE_URL" in capsys.readouterr().err
    monkeypatch.setenv("LLMSTREAM_WORKER_TIER_CHECK", "maybe")
    assert cli.main([]) == 2
    assert "LLMSTREAM_WORKER_TIER_CHECK='maybe' is not a boolean" in capsys.readouterr().err
