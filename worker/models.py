"""gRPC channels to the model server replicas, and the model versions they report."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from llmstream.v1 import model_service_pb2, model_service_pb2_grpc

# How long a replica's ListModels answer (or failure) is reused for `started` events.
VERSION_TTL_S = 30.0
VERSION_TIMEOUT_S = 1.0

_CHANNEL_OPTIONS = [
    # A restarted replica is found again within a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 16 << 20),
]


class ModelServers:
    def __init__(self, tls_ca: str = "") -> None:
        """`tls_ca`: PEM file of the CA of the replicas' certificates, `system` for the system
        store, empty for plaintext."""
        self._tls_ca = tls_ca
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, model_service_pb2_grpc.ModelServiceStub] = {}
        self._versions: dict[tuple[str, str], str] = {}
        self._versions_at: dict[str, float] = {}

    def stub(self, replica: str) -> model_service_pb2_grpc.ModelServiceStub:
        stub = self._stubs.get(replica)
        if stub is None:
            if self._tls_ca:
                roots = None if self._tls_ca == "system" else Path(self._tls_ca).read_bytes()
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
                channel = grpc.aio.secure_channel(replica, credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(replica, options=_CHANNEL_OPTIONS)
            self._channels[replica] = channel
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            self._stubs[replica] = stub
        return stub

    async def version(self, replica: str, model: str) -> str:
        """Version of a replica's model for `started` events ("" if unknown)."""
        now = time.monotonic()
        if now - self._versions_at.get(replica, -1e9) > VERSION_TTL_S:
            self._versions_at[replica] = now
            try:
                resp = await self.stub(replica).ListModels(
                    model_service_pb2.ListModelsRequest(), timeout=VERSION_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                return ""
            for info in resp.models:
                self._versions[(replica, info.name)] = info.version
        return self._versions.get((replica, model), "")

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
