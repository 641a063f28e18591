"""Ports a service is about to listen on: refuse clearly when one is taken.

Every service checks its ports before it starts, so a taken port is one line naming the port,
what wanted it and the variable that moves it, instead of a traceback from deep inside
grpc/aiohttp/prometheus_client.
"""

from __future__ import annotations

import errno
import socket


class PortInUse(RuntimeError):
    pass


def ensure_free(host: str, port: int, purpose: str, setting: str) -> None:
    """Raise PortInUse if nothing could listen on host:port now (port 0 means "any": fine)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"{purpose} port {host}:{port} is already in use (another llmstream "
                    f"process, or `make up` already running?): stop it or set {setting}"
                ) from None
            raise


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and benchmarks that start servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
