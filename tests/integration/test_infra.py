"""`llmstream_tools.infra` against real processes.

The first tests use the shared infrastructure (`llmstream infra up` in the configured state
dir) and leave it running. The others run in a throwaway LLMSTREAM_STATE_DIR with their own
ports, so they never disturb the shared servers; they stop what they started.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from llmstream import config, kafka
from llmstream.ports import free_port
from llmstream_tools import infra
from llmstream_tools.infra import _common

pytestmark = pytest.mark.integration

T = 20.0  # seconds: bound of every client await


def _unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- Kafka helpers


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        **kafka.Connection(bootstrap).client_kwargs("test-infra"), request_timeout_ms=10000
    )
    await asyncio.wait_for(admin.start(), T)
    return admin


async def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = await _admin(bootstrap)
    try:
        await asyncio.wait_for(admin.create_topics([NewTopic(name, partitions, 1)]), T)
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = await _admin(bootstrap)
    try:
        existing = set(await asyncio.wait_for(admin.list_topics(), T))
        doomed = [n for n in names if n in existing]
        if doomed:
            await asyncio.wait_for(admin.delete_topics(doomed), T)
    finally:
        await admin.close()


async def _partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = await _admin(bootstrap)
    try:
        topics = await asyncio.wait_for(admin.describe_topics(names), T)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in topics if t["error_code"] == 0}


async def _read_committed(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The first `count` committed values of partition 0 of topic."""
    consumer = AIOKafkaConsumer(
        **kafka.Connection(bootstrap).client_kwargs("test-infra"),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await asyncio.wait_for(consumer.start(), T)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await asyncio.wait_for(consumer.seek_to_beginning(tp), T)
        values: list[bytes] = []
        deadline = time.monotonic() + T
        while len(values) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500)
            values += [m.value for m in batches.get(tp, []) if m.value is not None]
        return values
    finally:
        await consumer.stop()


async def _produce_idempotent(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(
        **kafka.Connection(bootstrap).client_kwargs("test-infra"),
        enable_idempotence=True,
        acks="all",
    )
    await asyncio.wait_for(producer.start(), T)
    try:
        for value in values:
            await asyncio.wait_for(producer.send_and_wait(topic, value, partition=0), T)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- shared infra


@pytest.fixture(scope="module")
def shared() -> list[infra.ComponentStatus]:
    return infra.up()


@pytest.fixture(scope="module")
def shared_urls(shared: list[infra.ComponentStatus]) -> tuple[str, str, str]:
    """Kafka bootstrap, PostgreSQL URL and Redis URL of the shared servers."""
    return infra.kafka_bootstrap(), config.database_url(), config.redis_url()


async def test_up_twice_reuses_and_every_component_answers(
    shared: list[infra.ComponentStatus],
) -> None:
    again = infra.up()
    assert [s.name for s in again] == ["kafka", "postgres", "redis"]
    for first, second in zip(shared, again, strict=True):
        assert second.running, second
        assert second.state == first.state  # same pid, or external both times
        if second.started_by_llmstream:
            assert second.pid is not None and _common.pid_alive(second.pid)
            assert f"pid {second.pid}" in second.state
    if again[0].started_by_llmstream:
        assert infra.kafka_pid() == again[0].pid
    assert [s.state for s in infra.status()] == [s.state for s in again]

    bootstrap = infra.kafka_bootstrap()
    topic = _unique("test.infra")
    await _create_topic(bootstrap, topic, 1)
    try:
        # Idempotent producer: start, produce, read back.
        await _produce_idempotent(bootstrap, topic, [b"plain"])
        # Transactional producer: an aborted record stays invisible, a committed one shows.
        producer = AIOKafkaProducer(
            **kafka.Connection(bootstrap).client_kwargs("test-infra"),
            transactional_id=_unique("test.tx"),
        )
        await asyncio.wait_for(producer.start(), T)
        try:
            await asyncio.wait_for(producer.begin_transaction(), T)
            await asyncio.wait_for(producer.send_and_wait(topic, b"aborted", partition=0), T)
            await asyncio.wait_for(producer.abort_transaction(), T)
            async with producer.transaction():
                await asyncio.wait_for(producer.send_and_wait(topic, b"committed", partition=0), T)
        finally:
            await producer.stop()
        assert await _read_committed(bootstrap, topic, 2) == [b"plain", b"committed"]
    finally:
        await _delete_topics(bootstrap, [topic])

    conn = await psycopg.AsyncConnection.connect(config.database_url(), connect_timeout=10)
    async with conn:
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)

    client = aioredis.from_url(config.redis_url(), socket_timeout=5, socket_connect_timeout=5)
    try:
        key = _unique("test:infra")
        assert await client.set(key, b"v", ex=60)
        assert await client.get(key) == b"v"
    finally:
        await client.aclose()


@pytest.fixture
async def topic_env(
    shared: list[infra.ComponentStatus], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, int]]:
    """Unique topic names and small partition counts for ensure_topics()."""
    wanted = {_unique("test.prompts"): 4, _unique("test.tokens"): 3, _unique("test.dlq"): 1}
    (prompts, p), (tokens, t), (dlq, d) = wanted.items()
    for name, value in (
        ("TOPIC_PROMPTS", prompts),
        ("TOPIC_TOKENS", tokens),
        ("TOPIC_DLQ", dlq),
        ("PROMPTS_PARTITIONS", str(p)),
        ("TOKENS_PARTITIONS", str(t)),
        ("DLQ_PARTITIONS", str(d)),
    ):
        monkeypatch.setenv(config.PREFIX + name, value)
    yield wanted
    await _delete_topics(infra.kafka_bootstrap(), list(wanted))


async def test_ensure_topics_is_idempotent_and_matches_config(topic_env: dict[str, int]) -> None:
    infra.ensure_topics()
    infra.ensure_topics()
    assert await _partition_counts(infra.kafka_bootstrap(), list(topic_env)) == topic_env


async def test_ensure_topics_refuses_a_topic_with_fewer_partitions(
    topic_env: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = next(iter(topic_env))
    await _create_topic(infra.kafka_bootstrap(), prompts, 2)
    with pytest.raises(infra.InfraError) as err:
        infra.ensure_topics()
    message = str(err.value)
    assert message.startswith("kafka: ")
    assert f"topic {prompts} has 2 partitions, fewer than the 4" in message
    assert "LLMSTREAM_PROMPTS_PARTITIONS" in message
    assert "\n" not in message
    # More partitions than configured is fine.
    monkeypatch.setenv("LLMSTREAM_PROMPTS_PARTITIONS", "1")
    infra.ensure_topics()


# --------------------------------------------------------------------------- isolated infra


def _isolate(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    monkeypatch.setenv("LLMSTREAM_STATE_DIR", str(state))
    monkeypatch.setenv("LLMSTREAM_KAFKA_PORT", str(free_port()))
    for name in (
        "KAFKA_BOOTSTRAP",
        "DATABASE_URL",
        "REDIS_URL",
        "KAFKA_EXTRA_PROPERTIES",
        "KAFKA_USERNAME",
        "KAFKA_PASSWORD",
        "KAFKA_SECURITY_PROTOCOL",
    ):
        monkeypatch.delenv(config.PREFIX + name, raising=False)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway state dir and Kafka port; whatever gets started there is stopped after."""
    state = tmp_path / "state"
    _isolate(monkeypatch, state)
    yield state
    infra.down()


@pytest.fixture(scope="module")
def kafka_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One throwaway Kafka state dir for the broker tests (formatted once: saves a JVM run)."""
    return tmp_path_factory.mktemp("kafka") / "state"


@pytest.fixture
def isolated_kafka(kafka_state: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    _isolate(monkeypatch, kafka_state)
    yield kafka_state
    infra.down()


@pytest.mark.parametrize("listening", [True, False])
def test_port_taken_by_another_program(isolated: Path, listening: bool) -> None:
    port = config.get_int("KAFKA_PORT")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        if listening:
            squatter.listen()
        started = time.monotonic()
        with pytest.raises(infra.InfraError) as err:
            infra.up(["kafka"])
    message = str(err.value)
    assert message.startswith(f"kafka: port {port} is in use by another program")
    assert "LLMSTREAM_KAFKA_PORT" in message
    assert time.monotonic() - started < 10
    assert infra.kafka_pid() is None
    assert not (isolated / "kafka" / "kafka.pid").exists()


def test_missing_java(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(infra.InfraError) as err:
        infra.up(["kafka"])
    assert str(err.value) == (
        "kafka: java not found; install OpenJDK 17+ (apt-get install openjdk-17-jre-headless)"
    )


def test_maven_failure_names_the_artifact(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMSTREAM_CACHE_DIR", str(cache))
    monkeypatch.setenv("LLMSTREAM_KAFKA_VERSION", "0.0.1-no-such-version")
    with pytest.raises(infra.InfraError) as err:
        infra.up(["kafka"])
    message = str(err.value)
    assert message.startswith(
        "kafka: Maven could not fetch org.apache.kafka:kafka_2.13:0.0.1-no-such-version: "
    )
    assert "Maven Central must be reachable" in message
    assert "\n" not in message and "\x1b" not in message
    jars = cache / "kafka-0.0.1-no-such-version"
    assert not (jars / ".complete").exists() and not (jars / "libs").exists()


def test_broker_that_exits_during_startup_names_its_log(
    isolated_kafka: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSTREAM_KAFKA_EXTRA_PROPERTIES", "authorizer.class.name=no.such.Class")
    started = time.monotonic()
    with pytest.raises(infra.InfraError) as err:
        infra.up(["kafka"])
    message = str(err.value)
    assert time.monotonic() - started < config.get_int("STARTUP_TIMEOUT_S") + 30
    assert message.startswith("kafka: the broker (pid ")
    assert "exited during startup" in message
    assert f"see {isolated_kafka / 'kafka' / 'kafka.log'}" in message
    assert "no.such.Class" in message  # the root cause, from the log
    assert "\n" not in message
    assert infra.kafka_pid() is None


def test_broker_not_ready_in_time_is_stopped_and_names_its_log(
    isolated_kafka: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSTREAM_STARTUP_TIMEOUT_S", "1")
    started = time.monotonic()
    with pytest.raises(infra.InfraError) as err:
        infra.up(["kafka"])
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert "did not answer on 127.0.0.1:" in message and "within 1 s" in message
    assert f"see {isolated_kafka / 'kafka' / 'kafka.log'}" in message
    assert "LLMSTREAM_STARTUP_TIMEOUT_S" in message
    assert elapsed < 20  # 1 s of waiting, plus JVM start and the storage format if first
    # The half-started broker was stopped, not left behind.
    assert infra.kafka_pid() is None
    assert not (isolated_kafka / "kafka" / "kafka.pid").exists()


async def test_kafka_kill_and_restart_keeps_data(isolated_kafka: Path) -> None:
    (first,) = infra.up(["kafka"])
    assert first.started_by_llmstream and first.pid == infra.kafka_pid()
    bootstrap = infra.kafka_bootstrap()
    topic = _unique("test.restart")
    await _create_topic(bootstrap, topic, 1)
    await _produce_idempotent(bootstrap, topic, [b"before-crash"])

    assert infra.stop_component("kafka", kill=True)  # SIGKILL: a crash
    assert first.pid is not None and not _common.pid_alive(first.pid)
    assert infra.kafka_pid() is None
    assert infra.status()[0].state == "stopped"

    restarted = infra.start_component("kafka")
    assert restarted.started_by_llmstream and restarted.pid != first.pid
    await _produce_idempotent(bootstrap, topic, [b"after-restart"])
    assert await _read_committed(bootstrap, topic, 2) == [b"before-crash", b"after-restart"]

    assert infra.down() == ["kafka"]
    assert restarted.pid is not None and not _common.pid_alive(restarted.pid)
    assert infra.down() == []


def test_redis_stale_pid_file_is_cleaned_and_restarted(isolated: Path) -> None:
    (first,) = infra.up(["redis"])
    assert first.started_by_llmstream and first.pid is not None
    # Tooling's URL is the server's with the admin user's credentials.
    url = config.redis_url()
    assert url.startswith("redis://admin:")
    assert url.endswith("@" + first.address.removeprefix("redis://"))
    # A crash leaves the pid file behind.
    os.kill(first.pid, 9)
    assert _common.wait_dead(first.pid, 10)
    (isolated / "redis" / "redis.pid").write_text(f"{first.pid}\n")
    assert infra.status()[2].state == "stopped"
    (second,) = infra.up(["redis"])
    assert second.started_by_llmstream and second.pid != first.pid
    assert second.address == first.address and config.redis_url() == url  # same port, users
    assert infra.down(["redis"]) == ["redis"]
    assert not (isolated / "redis" / "redis.pid").exists()
    assert second.pid is not None and not _common.pid_alive(second.pid)


async def test_postgres_down_keeps_data(isolated: Path) -> None:
    (first,) = infra.up(["postgres"])
    assert first.started_by_llmstream
    url = config.database_url()
    assert url.startswith("postgresql://llmstream:") and "@127.0.0.1:" in url
    conn = await psycopg.AsyncConnection.connect(url, connect_timeout=10)
    async with conn:
        await conn.execute("create table kept (v text)")
        await conn.execute("insert into kept values ('still here')")
    assert infra.down() == ["postgres"]
    assert infra.status()[1].state == "stopped"
    (second,) = infra.up(["postgres"])
    assert second.pid != first.pid and config.database_url() == url
    conn = await psycopg.AsyncConnection.connect(url, connect_timeout=10)
    async with conn:
        cur = await conn.execute("select v from kept")
        assert await cur.fetchall() == [("still here",)]


def test_external_servers_are_used_not_started(
    shared_urls: tuple[str, str, str], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bootstrap, database_url, redis_url = shared_urls
    host, port = _common.split_host_port(bootstrap, 9092)
    if host in _common.LOCAL_HOSTS and "," not in bootstrap:
        # A Kafka broker already answering on the configured port is reused, not started.
        monkeypatch.setenv("LLMSTREAM_KAFKA_PORT", str(port))
    else:
        monkeypatch.setenv("LLMSTREAM_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("LLMSTREAM_DATABASE_URL", database_url)
    monkeypatch.setenv("LLMSTREAM_REDIS_URL", redis_url)
    statuses = infra.up()
    assert [s.state for s in statuses] == ["running (external)"] * 3
    assert [s.state for s in infra.status()] == ["running (external)"] * 3
    assert infra.kafka_pid() is None
    assert infra.down() == []
    assert not (isolated / "kafka" / "kafka.pid").exists()
    # A URL that answers nothing is a one-line error naming the variable.
    monkeypatch.setenv("LLMSTREAM_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(infra.InfraError, match=r"^redis: LLMSTREAM_REDIS_URL=redis://\S+ does "):
        infra.up(["redis"])


def test_a_cluster_formatted_before_authentication_is_refused_with_how_to_reformat(
    isolated: Path,
) -> None:
    (first,) = infra.up(["kafka"])
    assert "SASL_PLAINTEXT/SCRAM-SHA-512 + ACLs" in first.detail
    assert infra.down(["kafka"]) == ["kafka"]
    # What a state dir formatted by an earlier llmstream looks like: no users.
    (isolated / "kafka" / "credentials.json").unlink()
    with pytest.raises(infra.InfraError) as err:
        infra.up(["kafka"])
    assert str(err.value).startswith(
        f"kafka: the local cluster in {isolated / 'kafka'} was formatted before Kafka "
        "authentication (no credentials.json)"
    )
    assert f"delete {isolated / 'kafka'}" in str(err.value)
    assert infra.kafka_pid() is None
