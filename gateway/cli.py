"""`llmstream gateway`: run one gateway replica (WebSocket + HTTP on one port)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import uvloop

from gateway.settings import Settings, parse_partitions
from llmstream import config, ports, telemetry, tracing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmstream gateway",
        description="Run a gateway replica: WebSocket protocol v1 (docs/protocol.md), HTTP "
        "routes, prompts producer and consumer of its own tokens partitions. Defaults come "
        "from LLMSTREAM_* variables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=config.get("GATEWAY_HOST"))
    p.add_argument("--port", type=int, default=config.get_int("GATEWAY_PORT"))
    p.add_argument("--id", default=config.get("GATEWAY_ID"), help="replica id (empty: host-pid)")
    p.add_argument(
        "--partitions",
        default=config.get("GATEWAY_PARTITIONS"),
        help="owned tokens partitions, e.g. 0-5 (empty: split by --replica-index/--replicas)",
    )
    p.add_argument("--replica-index", type=int, default=config.get_int("GATEWAY_REPLICA_INDEX"))
    p.add_argument("--replicas", type=int, default=config.get_int("GATEWAY_REPLICAS"))
    p.add_argument(
        "--grace-s",
        type=float,
        default=float(config.get_int("GATEWAY_GRACE_S")),
        help="disconnect grace period before a cancel",
    )
    p.add_argument("--log-level", default=config.get("LOG_LEVEL"))
    return p


async def _run(settings: Settings) -> None:
    from gateway.server import Gateway

    gw = Gateway(settings)
    await gw.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gw.drain()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    telemetry.setup_logging("gateway", args.log_level)
    try:
        tracing.setup_tracing("gateway")
        settings = Settings.from_env()
        settings.host, settings.port = args.host, args.port
        settings.gateway_id = args.id or settings.gateway_id
        settings.partitions = parse_partitions(args.partitions) if args.partitions else None
        settings.replica_index, settings.replicas = args.replica_index, args.replicas
        settings.grace_s = args.grace_s
    except (config.ConfigError, ValueError) as exc:
        print(f"llmstream gateway: {exc}", file=sys.stderr)
        return 2
    ports.ensure_free(settings.host, settings.port, "gateway", "LLMSTREAM_GATEWAY_PORT")
    # uvloop like the other services: cheaper per event, and a socket's frames written in one
    # loop iteration leave in one syscall (uvloop flushes queued writes once per iteration).
    uvloop.run(_run(settings))
    return 0
