"""`llmstream`: the one entry point. Each subcommand has `--help`.

Service subcommands delegate to the service package's own `cli.main(argv)`, so each service
keeps its flags next to its code; this module only dispatches and owns the cross-cutting
commands (infra, up, tenants, keys, config).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from llmstream import config, ports

# subcommand -> (module with `main(argv) -> int`, one-line help)
DELEGATED: dict[str, tuple[str, str]] = {
    "gateway": ("gateway.cli", "Run a gateway replica (WebSocket + HTTP)."),
    "worker": ("worker.cli", "Run a worker (prompts -> gRPC -> token events)."),
    "model-server": ("model_server.cli", "Run a model server (gRPC ModelService)."),
    "aggregator": ("aggregator.cli", "Run the aggregator (events -> PostgreSQL/Redis)."),
    "replay": ("aggregator.replay_cli", "Fold a topic's events into request state."),
    "bench": ("llmstream_tools.bench.cli", "Run the benchmarks (results in bench/results/)."),
    "chaos": ("llmstream_tools.chaos.runner", "Fault injection suite (results in bench/results/)."),
    "infra": ("llmstream_tools.infra.cli", "Local Kafka/PostgreSQL/Redis: up | down | status."),
    "tenants": ("llmstream_tools.admin", "Manage tenants: create NAME [--tier T] | list."),
    "keys": (
        "llmstream_tools.admin",
        "Manage API keys: create --tenant NAME | revoke KEY_ID | list.",
    ),
    "up": ("llmstream_tools.up", "Start infra and every service; Ctrl-C stops them."),
    "top": (
        "llmstream_tools.top",
        "Live summary of the running services' metrics in the terminal.",
    ),
}


def _print_config(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmstream config", description=LOCAL["config"][1])
    parser.add_argument("--update-readme", metavar="README", help="rewrite the table in README")
    args = parser.parse_args(list(argv))
    if args.update_readme:
        path = Path(args.update_readme)
        path.write_text(config.with_readme_table(path.read_text()))
    else:
        print(config.markdown_table())
    return 0


LOCAL: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "config": (_print_config, "Print every LLMSTREAM_* variable with its default."),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmstream",
        description="Event-sourced LLM token streaming: gateway, workers, model servers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    for name, (_fn, help_text) in LOCAL.items():
        sub.add_parser(name, help=help_text)
    return parser


SERVICES = ("gateway", "worker", "model-server", "aggregator")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in LOCAL:
        return LOCAL[command][0](rest)
    if command not in DELEGATED:
        parser.error(f"unknown command {command!r}")
    module_name, _help = DELEGATED[command]
    module = importlib.import_module(module_name)
    # `tenants` and `keys` share one module; it needs to know which was asked for.
    entry: Callable[[Sequence[str]], int] = module.main
    # A service authenticates to Kafka and Redis as itself (its user in the infra record of
    # `llmstream infra up`), named before it reads any setting.
    acting = config.acting_as(command) if command in SERVICES else contextlib.nullcontext()
    try:
        with acting:
            if module_name == "llmstream_tools.admin":
                return int(entry([command, *rest]))
            return int(entry(rest))
    except ports.PortInUse as exc:
        print(f"llmstream {command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
