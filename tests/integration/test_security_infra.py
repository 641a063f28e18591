"""Kafka and Redis refuse whoever has no credentials, and each service's principal may do only
what docs/security.md's matrix says (issue #17): performed against the real servers of
`llmstream infra up`, with the clients the services use (aiokafka, redis-py) and kcat."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import SaslAuthenticationFailed, TopicAuthorizationFailedError
from redis.exceptions import AuthenticationError, NoPermissionError

from llmstream import config, kafka, topics
from llmstream_tools import stack

pytestmark = pytest.mark.integration

SERVICES = ("gateway", "worker", "aggregator")


@pytest.fixture
async def role_topics(kafka_bootstrap: str) -> AsyncIterator[dict[str, str]]:
    """Copies of the platform's prompts and tokens topics (`llmstream.prompts.sec-<hex>`): the
    ACLs are prefixed on the platform's names, so the copies get the same rules without the
    test touching the platform's own topics."""
    base = f"sec-{uuid.uuid4().hex[:8]}"
    names = {"prompts": f"{topics.prompts()}.{base}", "tokens": f"{topics.tokens()}.{base}"}
    await stack.create_topics(kafka_bootstrap, {n: 1 for n in names.values()})
    yield names
    await stack.delete_topics(kafka_bootstrap, list(names.values()))


async def produce(principal: str, topic: str, value: bytes) -> int:
    """Offset of the record `principal` wrote to `topic`."""
    producer = kafka.event_producer(kafka.Connection.from_env(principal), f"test-sec-{principal}")
    await asyncio.wait_for(producer.start(), 15)
    try:
        sent = await asyncio.wait_for(producer.send_and_wait(topic, value, key=b"k"), 30)
        return int(sent.offset)
    finally:
        await producer.stop()


async def read_first(principal: str, topic: str) -> bytes:
    """The first record of partition 0, read as `principal`."""
    reader = kafka.reader(kafka.Connection.from_env(principal), f"test-sec-{principal}")
    await asyncio.wait_for(reader.start(), 15)
    tp = TopicPartition(topic, 0)
    try:
        reader.assign([tp])
        reader.seek(tp, 0)
        while True:
            batch = await asyncio.wait_for(reader.getmany(tp, timeout_ms=500), 30)
            if batch.get(tp):
                return bytes(batch[tp][0].value)
    finally:
        await reader.stop()


def test_the_infra_requires_kafka_and_redis_credentials() -> None:
    """`make test` runs against an authenticated infra: every service has its own users."""
    auth = {p: config.kafka_auth(p) for p in SERVICES}
    assert {p: (a.security_protocol, a.username) for p, a in auth.items()} == {
        p: ("SASL_PLAINTEXT", p) for p in SERVICES
    }
    assert len({a.password for a in auth.values()}) == len(SERVICES)
    assert config.redis_url("gateway").startswith("redis://gateway:")
    assert config.redis_url("aggregator").startswith("redis://aggregator:")


async def test_kcat_without_credentials_can_neither_write_nor_read(
    kafka_bootstrap: str, role_topics: dict[str, str]
) -> None:
    topic = role_topics["prompts"]
    settings = ["-X", "message.timeout.ms=5000", "-X", "socket.timeout.ms=5000"]
    for mode in (["-P"], ["-C", "-o", "beginning", "-e"]):
        proc = await asyncio.create_subprocess_exec(
            "kcat", "-b", kafka_bootstrap, *mode, "-t", topic, "-p", "0", *settings,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(b"forged\n"), 60)
        assert proc.returncode != 0, (mode, out, err)
        assert "broker might require SASL authentication" in err.decode(), (mode, err)
        assert b"forged" not in out


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
async def test_kafka_refuses_a_wrong_password(kafka_bootstrap: str, mechanism: str) -> None:
    host, port = kafka_bootstrap.split(",")[0].rsplit(":", 1)
    with pytest.raises(SaslAuthenticationFailed, match="Authentication failed"):
        await create_conn(
            host,
            int(port),
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism=mechanism,
            sasl_plain_username="gateway" if mechanism != "PLAIN" else config.ADMIN,
            sasl_plain_password="not-the-password",
        )


# (principal, action, topic role): what the matrix refuses. Each refusal is the broker's
# authorization error, not a failed login (the allowed rows below use the same logins).
REFUSED = [
    ("gateway", "write", "tokens"),  # a gateway cannot forge generation events
    ("gateway", "read", "prompts"),  # nor read other requests' prompts
    ("worker", "write", "prompts"),  # a worker cannot submit work
    ("aggregator", "write", "tokens"),  # the aggregator only reads the event log
    ("aggregator", "write", "prompts"),
]
ALLOWED = [
    ("gateway", "write", "prompts"),
    ("gateway", "read", "tokens"),
    ("worker", "write", "tokens"),
    ("worker", "read", "prompts"),
    ("aggregator", "read", "prompts"),
    ("aggregator", "read", "tokens"),
]


@pytest.mark.parametrize(("principal", "action", "role"), REFUSED)
async def test_a_service_is_refused_what_its_acls_do_not_allow(
    principal: str, action: str, role: str, role_topics: dict[str, str]
) -> None:
    topic = role_topics[role]
    await produce(config.ADMIN, topic, b"seed")
    with pytest.raises(TopicAuthorizationFailedError) as refused:
        if action == "write":
            await produce(principal, topic, b"forged")
        else:
            await read_first(principal, topic)
    assert topic in str(refused.value)
    # Nothing the refused principal sent arrived: the partition holds the seed alone.
    assert await read_first(config.ADMIN, topic) == b"seed"


@pytest.mark.parametrize(("principal", "action", "role"), ALLOWED)
async def test_a_service_does_what_its_acls_allow(
    principal: str, action: str, role: str, role_topics: dict[str, str]
) -> None:
    topic = role_topics[role]
    if action == "write":
        assert await produce(principal, topic, b"mine") == 0
        assert await read_first(config.ADMIN, topic) == b"mine"
    else:
        await produce(config.ADMIN, topic, b"for you")
        assert await read_first(principal, topic) == b"for you"


async def test_redis_refuses_a_client_without_or_with_a_wrong_password() -> None:
    url = config.redis_url("gateway")
    # RESP2: the first command is the PING itself (with RESP3 the client's HELLO is refused
    # first, for the same reason).
    anonymous = aioredis.from_url(url.replace(url[8 : url.index("@") + 1], ""), protocol=2)
    try:
        with pytest.raises(AuthenticationError, match="Authentication required"):
            await anonymous.ping()
    finally:
        await anonymous.aclose()
    user, rest = url[8:].split(":", 1)
    wrong = aioredis.from_url(f"redis://{user}:wrong{rest[rest.index('@') :]}")
    try:
        with pytest.raises(AuthenticationError, match="invalid username-password pair"):
            await wrong.ping()
    finally:
        await wrong.aclose()


async def test_redis_service_users_keep_to_their_keys_and_commands() -> None:
    gateway = aioredis.from_url(config.redis_url("gateway"))
    aggregator = aioredis.from_url(config.redis_url("aggregator"))
    key = f"gw:test-sec:{uuid.uuid4().hex[:8]}"
    try:
        assert await gateway.set(key, "v", ex=60)
        with pytest.raises(NoPermissionError, match="flushall"):
            await gateway.flushall()
        with pytest.raises(NoPermissionError, match="config"):
            await gateway.config_get("requirepass")
        with pytest.raises(NoPermissionError, match="keys"):
            await gateway.keys("*")
        with pytest.raises(NoPermissionError, match="no permissions to access one of the keys"):
            await gateway.set(f"other:{uuid.uuid4().hex[:8]}", "v")
        # The aggregator settles quota counters; sessions and request metadata are not its.
        with pytest.raises(NoPermissionError, match="no permissions to access one of the keys"):
            await aggregator.get(key)
        assert await gateway.get(key) == b"v"
    finally:
        await gateway.delete(key)
        await gateway.aclose()
        await aggregator.aclose()


def test_credentials_are_private_files_and_on_no_command_line() -> None:
    state = config.state_dir()
    files = [state / "infra.json", state / "kafka/credentials.json", state / "redis/users.json"]
    files += [state / "redis/users.acl", state / "kafka/server.properties"]
    files += [state / "kafka/admin.properties", state / "kafka/kcat.properties"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {
        f.name: "0o600" for f in files
    }
    record = json.loads((state / "infra.json").read_text())
    secrets = list(record["kafka_users"].values())
    secrets += [u.split(":")[2].split("@")[0] for u in record["redis_urls"].values()]
    secrets.append(record["database_url"].split(":")[2].split("@")[0])
    # The ACL file keeps hashes only.
    acl = (state / "redis/users.acl").read_text()
    assert not [s for s in secrets if s in acl]
    leaked = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue  # the process ended meanwhile
        leaked += [cmdline.parent.name for s in secrets if s in text]
    assert leaked == []
