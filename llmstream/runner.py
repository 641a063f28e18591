"""One way to run a service process, the same for all four services.

`run` sets up JSON logs, tracing and metrics, checks the ports the service will listen on (a
taken port is one line, not a traceback), runs the service's coroutine on uvloop and turns
SIGTERM/SIGINT into a `Shutdown` the service awaits: the first signal asks for a drain, a second
one for an immediate stop. Exit codes: 0 clean stop, 1 failure (port taken, start-up or fatal
error), 2 configuration error, 130 interrupted before the loop ran.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import uvloop

from llmstream import config, ports, telemetry, tracing

log = logging.getLogger("llmstream.runner")


@dataclass(frozen=True)
class Listen:
    """A port the service listens on, and the variable that moves it (for the error line)."""

    host: str
    port: int
    purpose: str
    setting: str


@dataclass(frozen=True)
class ServiceProcess:
    name: str  # "gateway", "worker", "model-server", "aggregator"
    log_level: str | None = None
    listens: Sequence[Listen] = ()
    # Its own Prometheus /metrics server; None with `metrics_inline` False: no metrics.
    metrics: Listen | None = None
    # The service serves /metrics on its own port (the gateway): install the provider only.
    metrics_inline: bool = False


class Shutdown:
    """SIGTERM/SIGINT as events: `requested` on the first signal (drain), `forced` on the
    second (stop now)."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.forced = asyncio.Event()
        self.signals = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # Unix event loops: the supported platform
            loop.add_signal_handler(sig, self.signal, sig)

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("%s: draining (send it again to stop now)", sig.name)
            self.requested.set()
        else:
            log.warning("%s again: stopping now", sig.name)
            self.forced.set()


ServiceMain = Callable[[Shutdown], Awaitable[int]]


def fail(service: str, message: str, code: int = 2) -> int:
    """A configuration or start-up problem: one line on stderr, no traceback."""
    print(f"llmstream {service}: {message}", file=sys.stderr)
    return code


def run(proc: ServiceProcess, main: ServiceMain) -> int:
    try:
        telemetry.setup_logging(proc.name, proc.log_level)
        tracing.setup_tracing(proc.name)
        for listen in proc.listens:
            ports.ensure_free(listen.host, listen.port, listen.purpose, listen.setting)
        if proc.metrics is not None and proc.metrics.port:
            m = proc.metrics
            ports.ensure_free(m.host, m.port, m.purpose, m.setting)
            telemetry.setup_metrics(proc.name, port=m.port, host=m.host)
        elif proc.metrics_inline:
            telemetry.setup_metrics(proc.name)
    except config.ConfigError as exc:
        return fail(proc.name, str(exc))
    except ports.PortInUse as exc:
        return fail(proc.name, str(exc), code=1)

    async def supervised() -> int:
        shutdown = Shutdown()
        shutdown.install()
        return await main(shutdown)

    try:
        return uvloop.run(supervised())
    except config.ConfigError as exc:
        return fail(proc.name, str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception:
        # Start-up failures (a dependency unreachable) and fatal errors: one log line with the
        # traceback, exit 1, and let the supervisor (k8s, `llmstream up`) restart the process.
        log.exception("%s stopped on an error", proc.name)
        return 1
