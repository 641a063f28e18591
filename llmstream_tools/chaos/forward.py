"""The TCP forwarder that connects a service in its own network namespace to the servers of
the host's loopback, over the namespace's veth link (`python -m llmstream_tools.chaos.forward`;
`chaos.netns` starts it and talks to it over stdin/stdout).

Why a forwarder: Kafka advertises 127.0.0.1:<port>, and so do the model servers, Redis and
PostgreSQL; inside a namespace 127.0.0.1 is the namespace's own loopback, and without
iptables/nft (not installed here) nothing can rewrite those addresses. So this process, one
per namespace, holds sockets in both namespaces (a socket belongs to the namespace its creating
thread was in: `setns(2)` around `socket()`):

- outbound, per server port P the service dials: a listener on the namespace's 127.0.0.1:P ->
  a socket created in the namespace that connects over the veth to a listener of this process
  on the host's end of the veth -> a host socket to 127.0.0.1:P. Everything the service sends
  crosses the veth, so `ip link set <veth> down` cuts it like a pulled cable;
- inbound, per port the service listens on (a gateway's port, /metrics): a listener on the
  host's 127.0.0.1:P -> a socket created in the namespace to the namespace's 127.0.0.1:P (not
  over the veth: clients and the runner reach the service whatever its link does).

The host-side relays of the routes marked `delay` hold every chunk `delay_ms / 2` in each
direction before passing it on (`delay <ms>` on stdin): every round trip through them takes
`delay_ms` longer. `tc netem` does not exist on these machines, and `tc tbf` only caps the rate
(the delay it adds grows with the load and ends in drops), so the forwarder adds the latency.
`probe <port>` answers with the round trip of a Kafka ApiVersions request from inside the
namespace over the veth to the broker behind route <port>, or the error it met.

Protocol: one JSON object per line on stdout: {"ready": true} once every listener is bound, then
one answer per command line read from stdin ({"ok": ...} or {"error": ...}). EOF on stdin stops
the forwarder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
CHUNK = 65536
# Chunks held per direction while delayed; a full queue stops the reader (backpressure).
QUEUE_CHUNKS = 256
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Namespaces:
    """File descriptors of the host's and the service's network namespace."""

    def __init__(self, netns: str) -> None:
        self.host = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.inner = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """This thread in the service's namespace for the block (no await inside it)."""
        _setns(self.inner)
        try:
            yield
        finally:
            _setns(self.host)

    def socket(self, inner: bool) -> socket.socket:
        if not inner:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            with self.inside():
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock


def _listener(sock: socket.socket, address: tuple[str, int]) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(256)
    return sock


@dataclass
class Route:
    port: int  # of the server on the host's 127.0.0.1 (and of the namespace's listener)
    delay: bool  # subject to `delay <ms>`
    link_port: int = 0  # of this process' listener on the host end of the veth


class Forwarder:
    def __init__(self, ns: Namespaces, host_ip: str) -> None:
        self.ns = ns
        self.host_ip = host_ip
        self.delay_s = 0.0  # per direction
        self.servers: list[asyncio.Server] = []
        self.relays: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()  # both sides of every relay

    async def _connect(self, inner: bool, address: tuple[str, int]) -> socket.socket:
        sock = self.ns.socket(inner)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _serve(
        self, sock: socket.socket, inner: bool, target: tuple[str, int], delay: bool
    ) -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.relays.add(task)
            try:
                try:
                    upstream = await self._connect(inner, target)
                except (OSError, TimeoutError):
                    return  # the client sees its connection closed: nothing reached it
                up_reader, up_writer = await asyncio.open_connection(sock=upstream, limit=CHUNK)
                self.writers |= {writer, up_writer}
                pipes = [
                    asyncio.create_task(self._pipe(reader, up_writer, delay)),
                    asyncio.create_task(self._pipe(up_reader, writer, delay)),
                ]
                try:
                    # An EOF passes on (the other direction may go on: a half close); an
                    # error in either direction ends both.
                    for finished in asyncio.as_completed(pipes):
                        if not await finished:
                            break
                finally:
                    for pipe in pipes:
                        pipe.cancel()
                    await asyncio.gather(*pipes, return_exceptions=True)
                    up_writer.close()
                    self.writers.discard(up_writer)
            finally:
                writer.close()
                self.writers.discard(writer)
                self.relays.discard(task)

        self.servers.append(await asyncio.start_server(accepted, sock=sock, limit=CHUNK))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: bool
    ) -> bool:
        """Copy until EOF (True) or an error on either side (False); on a delayed route each
        chunk leaves `delay_s` after it arrived."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def receive() -> None:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((time.monotonic(), data))
                if not data:
                    return

        async def send() -> None:
            while True:
                arrived, data = await queue.get()
                if delay and self.delay_s:
                    await asyncio.sleep(max(0.0, arrived + self.delay_s - time.monotonic()))
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(receive()), asyncio.create_task(send())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            return not any(t.exception() is not None for t in done)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def start(self, routes: Sequence[Route], inbound: Sequence[int]) -> None:
        for r in routes:
            link = _listener(self.ns.socket(inner=False), (self.host_ip, 0))
            r.link_port = link.getsockname()[1]
            await self._serve(link, False, ("127.0.0.1", r.port), r.delay)
            local = _listener(self.ns.socket(inner=True), ("127.0.0.1", r.port))
            await self._serve(local, True, (self.host_ip, r.link_port), False)
        for port in inbound:
            await self._serve(
                _listener(self.ns.socket(inner=False), ("127.0.0.1", port)),
                True,
                ("127.0.0.1", port),
                False,
            )

    async def probe(self, route: Route) -> float:
        """Round trip (s) of a Kafka ApiVersions v0 request from inside the namespace, over
        the veth and this route's host relay, to the broker."""
        started = time.monotonic()
        sock = await self._connect(True, (self.host_ip, route.link_port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            client_id = b"llmstream-chaos-probe"
            body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
            writer.write(struct.pack(">i", len(body)) + body)
            await writer.drain()
            (size,) = struct.unpack(">i", await reader.readexactly(4))
            (correlation,) = struct.unpack(">i", (await reader.readexactly(size))[:4])
        finally:
            writer.close()
        if correlation != 7:
            raise OSError(f"the broker answered correlation id {correlation}, not 7")
        return time.monotonic() - started


async def _commands(fwd: Forwarder, routes: Sequence[Route]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    by_port = {r.port: r for r in routes}
    while line := (await reader.readline()).decode().split():
        answer: dict[str, object]
        if line[0] == "delay" and len(line) == 2:
            fwd.delay_s = float(line[1]) / 2000
            answer = {"ok": fwd.delay_s * 2000}
        elif line[0] == "probe" and len(line) == 2 and int(line[1]) in by_port:
            try:
                rtt = await asyncio.wait_for(fwd.probe(by_port[int(line[1])]), PROBE_TIMEOUT_S)
                answer = {"ok": round(rtt * 1000, 2)}
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}".rstrip(": ")}
        else:
            answer = {"error": f"unknown command {' '.join(line)!r}"}
        print(json.dumps(answer), flush=True)


async def _main(args: argparse.Namespace) -> None:
    ns = Namespaces(args.netns)
    routes = [Route(int(p.split(":")[0]), p.endswith(":delay")) for p in args.out]
    fwd = Forwarder(ns, args.host_ip)
    await fwd.start(routes, [int(p) for p in args.inbound])
    print(json.dumps({"ready": True}), flush=True)
    try:
        await _commands(fwd, routes)
    finally:
        for server in fwd.servers:
            server.close()
        # Closed connections end their relays (an EOF each way), which cancelling them would
        # not do cleanly: asyncio's stream server asks a cancelled handler for its exception.
        for writer in list(fwd.writers):
            writer.close()
        if fwd.relays:
            await asyncio.wait(list(fwd.relays), timeout=5)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmstream_tools.chaos.forward")
    parser.add_argument("--netns", required=True, help="name under /var/run/netns")
    parser.add_argument("--host-ip", required=True, help="the host's end of the veth")
    parser.add_argument(
        "--out", nargs="*", default=[], help="PORT or PORT:delay per server the service dials"
    )
    parser.add_argument("--inbound", nargs="*", default=[], help="ports the service listens on")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
