"""`llmstream gateway` CLI: help and configuration errors."""

from __future__ import annotations

import pytest

from gateway import cli


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "--partitions" in capsys.readouterr().out


def test_bad_partitions_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMSTREAM_REDIS_URL", "redis://x")
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", "postgresql://x")
    assert cli.main(["--partitions", "1-x"]) == 2
    assert "bad partition range" in capsys.readouterr().err
