"""TLS: the gateway serving https/wss (LLMSTREAM_GATEWAY_TLS_CERT/KEY) and gRPC between worker
and model server (LLMSTREAM_MODEL_SERVER_TLS_CERT/KEY, LLMSTREAM_WORKER_MODEL_SERVER_TLS_CA),
with a CA and a server certificate made here by the `cryptography` package."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from llmstream.v1 import model_service_pb2, model_service_pb2_grpc
from llmstream_tools import stack
from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import Client, FakeWorker, Topics

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate (what clients trust)
    cert: Path  # the server's certificate, for 127.0.0.1 and localhost, signed by the CA
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certs(directory: Path, name: str = "llmstream test") -> Certs:
    """A throwaway CA and a server certificate it signed (EC P-256, valid for a day)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} CA"))
        .issuer_name(_name(f"{name} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certs.key.chmod(0o600)
    return certs


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5, **kw) as resp:
            status, hdrs, body = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, body = exc.code, dict(exc.headers), exc.read()
    return status, hdrs, json.loads(body)


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    t = await testing.create_topics(kafka_bootstrap, partitions=2)
    yield t
    await testing.delete_topics(t)


async def test_gateway_serves_https_and_wss_with_a_secure_cookie(
    topics: Topics, db_env: str, redis_url: str, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    s = testing.settings(
        topics,
        redis_url,
        db_env,
        "gw-tls",
        [0, 1],
        tls_cert=str(certs.cert),
        tls_key=str(certs.key),
    )
    assert not s.cookie_secure  # Secure must follow from serving TLS alone
    _tenant, _name, key = await testing.new_tenant()
    trust = ssl.create_default_context(cafile=str(certs.ca))
    async with testing.running(s), FakeWorker(topics):
        base = f"https://127.0.0.1:{s.port}"
        status, _h, body = await asyncio.to_thread(http, f"{base}/healthz", context=trust)
        assert status == 200 and body["status"] == "ok"
        # The port speaks only TLS; and a client that does not trust the CA refuses it.
        with pytest.raises(OSError):
            await asyncio.to_thread(http, f"http://127.0.0.1:{s.port}/healthz")
        with pytest.raises(urllib.error.URLError) as refused:
            await asyncio.to_thread(http, f"{base}/healthz", context=ssl.create_default_context())
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        # Browser sign-in over https: the cookie is Secure, HttpOnly and SameSite=Strict.
        status, hdrs, _ = await asyncio.to_thread(
            http,
            f"{base}/v1/sessions",
            "POST",
            {"Authorization": f"Bearer {key}", "Origin": base},
            context=trust,
        )
        assert status == 200
        attributes = [a.strip() for a in hdrs["Set-Cookie"].split(";")]
        assert {"Secure", "HttpOnly", "SameSite=Strict"} <= set(attributes)
        session = attributes[0]
        # wss with the cookie from the gateway's own https origin streams exactly.
        ws = await connect(
            f"wss://127.0.0.1:{s.port}/ws",
            ssl=trust,
            additional_headers={"Cookie": session, "Origin": base},
        )
        c = Client(ws)
        await c.submit("a", max_tokens=6)
        rid = (await c.wait_ref("a"))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None)
        assert c.streams[rid].text == "".join(testing.token_text(rid, q) for q in range(1, 7))
        await c.close()
        # Another origin (even the plain-http one of the same host) is refused at the upgrade.
        for origin in (f"http://127.0.0.1:{s.port}", "https://evil.example"):
            with pytest.raises(InvalidStatus) as exc:
                await connect(
                    f"wss://127.0.0.1:{s.port}/ws",
                    ssl=trust,
                    additional_headers={"Cookie": session, "Origin": origin},
                )
            assert exc.value.response.status_code == 403
        # A bearer-key client over wss; over plain ws the upgrade never happens.
        ws = await connect(
            f"wss://127.0.0.1:{s.port}/ws",
            ssl=trust,
            additional_headers={"Authorization": f"Bearer {key}"},
        )
        c = Client(ws)
        await c.wait(lambda: c.hello is not None)
        await c.close()
        with pytest.raises(Exception):  # noqa: B017 - any failure: no TLS, no WebSocket
            await asyncio.wait_for(
                connect(
                    f"ws://127.0.0.1:{s.port}/ws",
                    additional_headers={"Authorization": f"Bearer {key}"},
                ),
                5,
            )


async def _list_models(target: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials)
    async with channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        resp = await stub.ListModels(model_service_pb2.ListModelsRequest(), timeout=3)
        return [m.name for m in resp.models]


async def test_worker_streams_from_a_tls_model_server(tmp_path: Path) -> None:
    """Real processes: the model server serves gRPC over TLS only; the worker trusts its CA;
    a request submitted at the gateway streams to the end."""
    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other", "someone else")
    env = {
        "LLMSTREAM_MODEL_SERVER_TLS_CERT": str(certs.cert),
        "LLMSTREAM_MODEL_SERVER_TLS_KEY": str(certs.key),
        "LLMSTREAM_WORKER_MODEL_SERVER_TLS_CA": str(certs.ca),
    }
    async with stack.local_stack(tmp_path, workers=1, extra_env=env) as st:
        _tenant, key = await st.tenant_key("standard")
        c = await Client.connect(st.gateway_port, key)
        await c.submit("tls", max_tokens=12)
        rid = (await c.wait_ref("tls", 20))["request_id"]
        await c.wait(lambda: c.streams[rid].done is not None, 30)
        done = c.streams[rid].done
        assert done is not None and done["finish_reason"] == "length", done
        assert done["usage"]["completion_tokens"] == 12
        seqs = [q for q, _ in c.streams[rid].tokens]  # the worker may merge deltas
        assert seqs == list(range(1, len(seqs) + 1)) and seqs
        await c.close()
        trusted = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        assert await _list_models(st.model_server, trusted) == ["synthetic"]
        for creds in (None, grpc.ssl_channel_credentials(other.ca.read_bytes())):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await _list_models(st.model_server, creds)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        log = (tmp_path / "model-server.log").read_text()
        assert "(TLS)" in log
