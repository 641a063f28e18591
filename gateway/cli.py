"""`llmstream gateway`: run one gateway replica (WebSocket + HTTP on one port)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence

from gateway.settings import Settings, parse_partitions
from llmstream import config, runner

SERVICE = "gateway"


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
        default=config.get_float("GATEWAY_GRACE_S"),
        help="disconnect grace period before a cancel",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=config.get_int("GATEWAY_METRICS_PORT"),
        help="serve Prometheus /metrics on this port, never on the public one (0: off)",
    )
    p.add_argument("--log-level", default=config.get("LOG_LEVEL"))
    return p


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    settings.host, settings.port = args.host, args.port
    settings.gateway_id = args.id or settings.gateway_id
    settings.partitions = parse_partitions(args.partitions) if args.partitions else None
    settings.replica_index, settings.replicas = args.replica_index, args.replicas
    settings.grace_s = args.grace_s
    settings.metrics_port = args.metrics_port
    return settings


async def serve(settings: Settings, shutdown: runner.Shutdown) -> int:
    """Start, serve until SIGTERM, then drain (a second signal stops at once)."""
    # Imported here: `--help` and configuration errors need none of the service's clients.
    from gateway.server import Gateway

    gw = Gateway(settings)
    await gw.start()
    await shutdown.requested.wait()
    drain = asyncio.create_task(gw.drain())
    forced = asyncio.create_task(shutdown.forced.wait())
    await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if drain.done():
        await drain  # a failed drain is the process's failure
    else:
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await gw.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(list(argv) if argv is not None else None)
        settings = _settings(args)
    except (config.ConfigError, ValueError) as exc:
        return runner.fail(SERVICE, str(exc))
    proc = runner.ServiceProcess(
        name=SERVICE,
        log_level=args.log_level,
        listens=[
            runner.Listen(settings.host, settings.port, SERVICE, "LLMSTREAM_GATEWAY_PORT"),
            *(
                [
                    runner.Listen(
                        settings.host,
                        settings.metrics_port,
                        f"{SERVICE} metrics",
                        "LLMSTREAM_GATEWAY_METRICS_PORT",
                    )
                ]
                if settings.metrics_port
                else []
            ),
        ],
        metrics_inline=True,
    )
    return runner.run(proc, lambda shutdown: serve(settings, shutdown))
