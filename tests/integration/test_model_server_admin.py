"""The admin RPC as an attacker on the same network would try it (issue 17): off by default (no
port, not in reflection), on its own port with a bearer token when on, engine options
allow-listed, reflection switchable off. Real gRPC servers on loopback, real grpcurl."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmstream.ports import free_port
from llmstream.v1 import (
    model_admin_pb2,
    model_admin_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
)
from llmstream_tools.testing.model_server import (
    ADMIN_TOKEN,
    admin_channel,
    admin_settings,
    bearer,
    generate,
    running_server,
    start,
    synthetic_spec,
)
from model_server.admin import AdminTokens
from model_server.admin_options import AdminPolicy
from model_server.server import ModelServer
from tests.integration.test_model_server_grpcurl import grpcurl
from tests.integration.test_tls import make_certs

ROOT = Path(__file__).resolve().parents[2]


def options(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


async def listed_services(channel: grpc.aio.Channel) -> set[str]:
    """The services a server's reflection lists."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    call = stub.ServerReflectionInfo(iter([request]), timeout=10)
    names: set[str] = set()
    async for response in call:
        names |= {s.name for s in response.list_services_response.service}
    return names


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


def closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_admin_is_off_by_default() -> None:
    async with running_server([synthetic_spec("m")]) as (srv, channel):
        assert srv.admin_port == 0
        assert await listed_services(channel) == {
            "llmstream.v1.ModelService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        # Not served on the public port either.
        admin = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
        err = await refused(
            admin.UnloadModel(model_admin_pb2.UnloadModelRequest(name="m"), metadata=bearer())
        )
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_cli_default_has_no_admin_port() -> None:
    """A real `llmstream model-server` with the defaults: the admin port stays closed."""
    port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "LLMSTREAM_MODEL_SERVER_ADMIN_PORT": str(admin_port),
        "LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    env.pop("LLMSTREAM_MODEL_SERVER_ADMIN", None)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "llmstream"), "model-server", "--engine", "synthetic",
        "--port", str(port), "--metrics-port", "0", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            for _ in range(200):  # until the model is loaded (hang guard)
                if (await stub.ListModels(model_service_pb2.ListModelsRequest())).models:
                    break
                await asyncio.sleep(0.05)
            assert closed(admin_port)
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert "admin off" in out.decode()


async def test_cli_refuses_admin_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSTREAM_MODEL_SERVER_ADMIN")}
    env["LLMSTREAM_MODEL_SERVER_ADMIN"] = "1"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "llmstream"), "model-server", "--engine", "synthetic",
        "--port", str(free_port()), "--admin-port", str(free_port()), "--metrics-port", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert (
        "--admin needs a token: LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN: no admin token" in err.decode()
    )


async def test_admin_needs_the_token_on_its_own_port() -> None:
    async with (
        running_server([synthetic_spec("m")], **admin_settings()) as (srv, channel),
        admin_channel(srv) as admin_ch,
    ):
        assert srv.admin_port not in (0, srv.port)
        # The public port does not serve it, token or not.
        public = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
        err = await refused(
            public.UnloadModel(model_admin_pb2.UnloadModelRequest(name="m"), metadata=bearer())
        )
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "llmstream.v1.ModelAdminService" not in await listed_services(channel)

        admin = model_admin_pb2_grpc.ModelAdminServiceStub(admin_ch)
        load = model_admin_pb2.LoadModelRequest(
            name="m2", engine="synthetic", options=options({"ttft_ms": 1, "itl_ms": 1})
        )
        for metadata, message in (
            ((), "missing bearer token"),
            ((("authorization", ADMIN_TOKEN),), "missing bearer token"),  # no "Bearer "
            (bearer("not-the-admin-token-at-all"), "invalid admin token"),
            (bearer(ADMIN_TOKEN + "x"), "invalid admin token"),
        ):
            err = await refused(admin.LoadModel(load, metadata=metadata))
            assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        err = await refused(admin.UnloadModel(model_admin_pb2.UnloadModelRequest(name="m")))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert srv.registry.get("m") is not None  # nothing was unloaded
        # Which methods exist is not told without a token; with one, an unknown one is that.
        probe = admin_ch.unary_unary("/llmstream.v1.ModelAdminService/DropEverything")
        err = await refused(probe(b""))
        assert (err.code(), err.details()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "missing bearer token",
        )
        err = await refused(probe(b"", metadata=bearer()))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        # Reflection on the admin port needs the token too.
        with pytest.raises(grpc.aio.AioRpcError) as reflect:
            await listed_services(admin_ch)
        assert reflect.value.code() == grpc.StatusCode.UNAUTHENTICATED

        loaded = await admin.LoadModel(load, metadata=bearer())
        assert (loaded.model.name, loaded.model.engine) == ("m2", "synthetic")
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        served = await generate(stub, start("m2", max_tokens=5))
        assert (served.code, len(served.token_ids)) == (grpc.StatusCode.OK, 5)
        unloaded = await admin.UnloadModel(
            model_admin_pb2.UnloadModelRequest(name="m2", drain_timeout_ms=100), metadata=bearer()
        )
        assert unloaded.cancelled_streams == 0
        assert (await generate(stub, start("m2"))).code == grpc.StatusCode.NOT_FOUND


async def test_token_file_rotation_without_restart(tmp_path: Path) -> None:
    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    token_file = tmp_path / "admin-token"
    token_file.write_text(old + "\n")
    tokens = AdminTokens(file=str(token_file))
    async with (
        running_server([synthetic_spec("m")], **admin_settings(admin_tokens=tokens)) as (srv, _),
        admin_channel(srv) as admin_ch,
    ):
        admin = model_admin_pb2_grpc.ModelAdminServiceStub(admin_ch)
        unload_x = model_admin_pb2.UnloadModelRequest(name="x")

        async def status(token: str) -> grpc.StatusCode:
            # NOT_FOUND: authenticated (there is no model x); UNAUTHENTICATED: refused.
            return (await refused(admin.UnloadModel(unload_x, metadata=bearer(token)))).code()

        assert await status(old) == grpc.StatusCode.NOT_FOUND
        assert await status(new) == grpc.StatusCode.UNAUTHENTICATED
        token_file.write_text(f"{old}\n{new}\n")  # rotation: both accepted meanwhile
        assert await status(old) == grpc.StatusCode.NOT_FOUND
        assert await status(new) == grpc.StatusCode.NOT_FOUND
        token_file.write_text(new + "\n")
        assert await status(old) == grpc.StatusCode.UNAUTHENTICATED
        assert await status(new) == grpc.StatusCode.NOT_FOUND
        token_file.write_text("")  # broken: everyone refused (fail closed)
        assert await status(new) == grpc.StatusCode.UNAUTHENTICATED


async def test_engine_options_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "outside.gguf").write_bytes(b"GGUF")
    (models / "escape.gguf").symlink_to(tmp_path / "outside.gguf")
    policy = AdminPolicy(model_dirs=(models,), max_instances=8)
    async with (
        running_server([synthetic_spec("m")], **admin_settings(admin_policy=policy)) as (srv, _),
        admin_channel(srv) as admin_ch,
    ):
        admin = model_admin_pb2_grpc.ModelAdminServiceStub(admin_ch)
        cases: list[tuple[str, dict[str, Any], str]] = [
            (
                "vllm",
                {"model": str(models), "engine_args": {"trust_remote_code": True}},
                "options.engine_args.trust_remote_code: not allowed over the admin RPC",
            ),
            (
                "vllm",
                {"model": "evil/remote-code-model"},
                "options.model: 'evil/remote-code-model'",
            ),
            ("llamacpp", {"model_path": "/etc/passwd"}, "options.model_path: '/etc/passwd'"),
            ("llamacpp", {"model_path": str(models / "escape.gguf")}, "options.model_path:"),
            ("llamacpp", {"instances": 10000}, "options.instances: must be in [1, 8], got 10000"),
            ("llamacpp", {"n_threads": "many"}, "options.n_threads: must be a number"),
            ("synthetic", {"fail_marker": "x"}, "options.fail_marker: not allowed"),
        ]
        for engine, opts, message in cases:
            request = model_admin_pb2.LoadModelRequest(
                name="evil", engine=engine, options=options(opts)
            )
            err = await refused(admin.LoadModel(request, metadata=bearer()))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (opts, err.details())
            assert (err.details() or "").startswith(message), (opts, err.details())
        # The same bound when the llama.cpp instances come from max_concurrency.
        request = model_admin_pb2.LoadModelRequest(
            name="evil",
            engine="llamacpp",
            limits=model_admin_pb2.ModelLimits(max_concurrency=10000),
        )
        err = await refused(admin.LoadModel(request, metadata=bearer()))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.details() or "").startswith("limits.max_concurrency: must be at most")
        assert {h.name for h in srv.registry.current()} == {"m"}


async def grpcurl_admin(srv: ModelServer, method: str, token: str | None) -> tuple[int, str]:
    """An admin call by grpcurl from the .proto file (no reflection); (exit status, stderr)."""
    auth = ("-H", f"authorization: Bearer {token}") if token is not None else ()
    rc, _, err, _ = await grpcurl(
        srv,
        method,
        flags=(
            *auth, "-import-path", str(ROOT / "proto"), "-proto", "llmstream/v1/model_admin.proto",
            "-d", json.dumps({"name": "nope"}),
        ),
        port=srv.admin_port,
    )  # fmt: skip
    return rc, err


async def test_grpcurl_admin_without_token_is_unauthenticated() -> None:
    async with running_server([synthetic_spec("m")], **admin_settings()) as (srv, _):
        method = "llmstream.v1.ModelAdminService/UnloadModel"
        rc, err = await grpcurl_admin(srv, method, None)
        assert rc != 0
        assert "Code: Unauthenticated" in err and "Message: missing bearer token" in err, err
        rc, err = await grpcurl_admin(srv, method, "wrong-token-xxxxxxxx")
        assert "Code: Unauthenticated" in err and "Message: invalid admin token" in err, err
        rc, err = await grpcurl_admin(srv, method, ADMIN_TOKEN)
        assert "Code: NotFound" in err, err  # authenticated: there is no model `nope`
        # Reflection on the admin port needs the token as well.
        rc, out, err, _ = await grpcurl(srv, "list", port=srv.admin_port)
        assert rc != 0 and "Unauthenticated" in err, err
        rc, out, err, _ = await grpcurl(
            srv, "list", flags=("-H", f"authorization: Bearer {ADMIN_TOKEN}"), port=srv.admin_port
        )
        assert rc == 0, err
        assert set(out.split()) == {
            "llmstream.v1.ModelAdminService",
            "grpc.reflection.v1alpha.ServerReflection",
        }


async def test_reflection_off() -> None:
    async with running_server([synthetic_spec("m")], **admin_settings(reflection=False)) as (
        srv,
        channel,
    ):
        for port, flags in (
            (srv.port, ()),
            (srv.admin_port, ("-H", f"authorization: Bearer {ADMIN_TOKEN}")),
        ):
            rc, _, err, _ = await grpcurl(srv, "list", flags=flags, port=port)
            assert rc != 0
            assert "server does not support the reflection API" in err, err
        # The service itself still answers.
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        assert [
            m.name for m in (await stub.ListModels(model_service_pb2.ListModelsRequest())).models
        ] == ["m"]


async def test_admin_port_speaks_tls_like_the_public_one(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    async with running_server(
        [synthetic_spec("m")],
        load=False,
        **admin_settings(tls_cert=str(certs.cert), tls_key=str(certs.key)),
    ) as (srv, _):
        trusted = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        unload = model_admin_pb2.UnloadModelRequest(name="nope")
        async with grpc.aio.secure_channel(f"127.0.0.1:{srv.admin_port}", trusted) as channel:
            admin = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
            err = await refused(admin.UnloadModel(unload, metadata=bearer(), timeout=5))
            assert err.code() == grpc.StatusCode.NOT_FOUND  # over TLS, authenticated
            err = await refused(admin.UnloadModel(unload, timeout=5))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.admin_port}") as plaintext:
            admin = model_admin_pb2_grpc.ModelAdminServiceStub(plaintext)
            err = await refused(admin.UnloadModel(unload, metadata=bearer(), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE  # no plaintext on a TLS port
