"""The recipe in docs/events.md works: kcat reads a record, protoc decodes it."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from aiokafka import AIOKafkaProducer

from llmstream import codec, kafka
from llmstream_tools.testing.kcat import kcat_auth_args

from ..conftest import REPO

pytestmark = pytest.mark.integration


async def run(*cmd: str, stdin: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode == 0, err.decode()
    return out


@pytest.mark.skipif(
    not (shutil.which("kcat") and shutil.which("protoc")),
    reason="kcat and protoc come from Debian packages kcat and protobuf-compiler (make test installs them)",
)
async def test_kcat_and_protoc_decode_an_event(kafka_bootstrap: str, topic_name: str) -> None:
    event = codec.new_event("req-kcat", "tenant-k", "test")
    event.token_delta.seq = 7
    event.token_delta.text = "hello from kcat"
    producer = AIOKafkaProducer(**kafka.Connection(kafka_bootstrap).client_kwargs("test-kcat"))
    await asyncio.wait_for(producer.start(), 15)
    try:
        await producer.send_and_wait(
            topic_name, codec.encode(event), key=codec.key(event), partition=0
        )
    finally:
        await producer.stop()
    with kcat_auth_args() as auth:
        raw = await run(
            "kcat", *auth, "-b", kafka_bootstrap, "-C", "-t", topic_name, "-p", "0",
            "-o", "beginning", "-c", "1", "-e", "-D", "",
        )  # fmt: skip
    decoded = (
        await run(
            "protoc",
            "-Iproto",
            "-I/usr/include",
            "--decode=llmstream.v1.Event",
            "llmstream/v1/events.proto",
            stdin=raw,
        )
    ).decode()
    assert 'request_id: "req-kcat"' in decoded
    assert 'text: "hello from kcat"' in decoded
    assert "seq: 7" in decoded
