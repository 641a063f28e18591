"""The `llmstream` entry point: every subcommand answers --help; unbuilt ones say so."""

from __future__ import annotations

import importlib

import pytest

from llmstream_tools import cli


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*cli.DELEGATED, *cli.LOCAL]:
        assert name in out


def test_no_arguments_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2


@pytest.mark.parametrize("command", sorted(cli.DELEGATED))
def test_each_subcommand_has_help_or_says_not_built(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module_name = cli.DELEGATED[command][0]
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError:
        assert cli.main([command]) == 2
        assert "not built yet" in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["gateway", "--port", "{port}"], "LLMSTREAM_GATEWAY_PORT"),
        (
            ["model-server", "--engine", "synthetic", "--port", "{port}"],
            "LLMSTREAM_MODEL_SERVER_PORT",
        ),
        (
            ["aggregator", "--no-migrate", "--metrics-port", "{port}"],
            "LLMSTREAM_AGGREGATOR_METRICS_PORT",
        ),
    ],
)
def test_taken_port_is_one_line_naming_the_setting(
    argv: list[str], setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code = cli.main([a.replace("{port}", port) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert f"127.0.0.1:{port} is already in use" in err
    assert setting in err
    assert "Traceback" not in err
