"""The model catalog over the real broker: the topic `infra` creates is compacted, workers'
announcements reach a follower that is already running and one that starts later (reading from
the beginning), and a tombstone retires a model on every follower."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from llmstream import catalog, config, kafka
from llmstream.v1 import model_service_pb2
from llmstream_tools import infra, stack

pytestmark = pytest.mark.integration

T = 20.0


@pytest.fixture
async def models_topic(monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str) -> AsyncIterator[str]:
    """Every topic `ensure_topics` makes, under unique names (the shared ones stay untouched);
    the catalog topic among them."""
    base = f"test.catalog.{uuid.uuid4().hex[:10]}"
    names = {
        "TOPIC_PROMPTS": f"{base}.prompts",
        "TOPIC_TOKENS": f"{base}.tokens",
        "TOPIC_DLQ": f"{base}.dlq",
        "TOPIC_MODELS": f"{base}.models",
    }
    for setting, name in names.items():
        monkeypatch.setenv(config.PREFIX + setting, name)
    for setting in ("PROMPTS_PARTITIONS", "TOKENS_PARTITIONS"):
        monkeypatch.setenv(config.PREFIX + setting, "1")
    await asyncio.to_thread(infra.ensure_topics)
    yield names["TOPIC_MODELS"]
    await stack.delete_topics(kafka_bootstrap, list(names.values()))


async def cleanup_policy(bootstrap: str, topic: str) -> str:
    admin = AIOKafkaAdminClient(
        **kafka.Connection(bootstrap).client_kwargs("test"), request_timeout_ms=10000
    )
    await asyncio.wait_for(admin.start(), T)
    try:
        [response] = await asyncio.wait_for(
            admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]), T
        )
    finally:
        await admin.close()
    [resource] = response.resources
    entries = {entry[0]: entry[1] for entry in resource[4]}
    return str(entries["cleanup.policy"])


@contextlib.asynccontextmanager
async def following(bootstrap: str, topic: str) -> AsyncIterator[catalog.CatalogFollower]:
    follower = catalog.CatalogFollower(
        kafka.Connection(bootstrap), topic, f"test-follower-{uuid.uuid4().hex[:6]}",
        fetch_max_wait_ms=50,
    )  # fmt: skip
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.ready.wait(), T)
        yield follower
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + T
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_announcements_reach_running_and_late_followers(
    kafka_bootstrap: str, models_topic: str
) -> None:
    assert await cleanup_policy(kafka_bootstrap, models_topic) == "compact"
    served = [
        catalog.ServedModel(
            model_service_pb2.ModelInfo(name="smollm2", engine="llamacpp", max_context=2048,
                                        max_tokens=1024, max_concurrency=2),
            ("127.0.0.1:50051",),
        ),
        catalog.ServedModel(
            model_service_pb2.ModelInfo(name="synthetic", engine="synthetic", max_tokens=4096),
            ("127.0.0.1:50052",),
        ),
    ]  # fmt: skip

    async def list_models() -> list[catalog.ServedModel]:
        return served

    conn = kafka.Connection(kafka_bootstrap)
    producer = kafka.event_producer(conn, "test-announcer")
    await asyncio.wait_for(producer.start(), T)
    try:
        async with following(kafka_bootstrap, models_topic) as early:
            assert early.catalog.models(now_ms()) == []  # an empty topic is ready at once
            announcer: asyncio.Task[None] = asyncio.create_task(
                catalog.announce_loop(producer, models_topic, list_models, 0.2, "worker-x")
            )
            try:
                await until(lambda: len(early.catalog.models(now_ms())) == 2, "2 models")
                # Several rounds in the log: a late reader folds them to one entry per model.
                await asyncio.sleep(0.6)
                async with following(kafka_bootstrap, models_topic) as late:
                    entries = {e.name: e for e in late.catalog.models(now_ms())}
                    assert sorted(entries) == ["smollm2", "synthetic"]
                    smol = entries["smollm2"]
                    assert (smol.max_tokens, smol.max_context, smol.engine) == (
                        1024, 2048, "llamacpp",
                    )  # fmt: skip
                    assert smol.model_servers == ("127.0.0.1:50051",)
                    assert (smol.announcer_id, smol.interval_ms) == ("worker-x", 200)
                    await stop(announcer)
                    # An operator retires a model with a tombstone: gone everywhere at once.
                    await producer.send_and_wait(
                        models_topic, key=catalog.key("synthetic"), value=None
                    )
                    await until(
                        lambda: all(
                            f.catalog.last_known("synthetic") is None for f in (early, late)
                        ),
                        "the tombstone on both followers",
                    )
                    # Nobody announces any more: the rest expires after 3 intervals.
                    await until(lambda: late.catalog.models(now_ms()) == [], "expiry")
                    assert late.catalog.last_known("smollm2") is not None
            finally:
                await stop(announcer)
    finally:
        await producer.stop()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_following_a_missing_topic_says_what_to_do(kafka_bootstrap: str) -> None:
    follower = catalog.CatalogFollower(
        kafka.Connection(kafka_bootstrap), f"test.absent.{uuid.uuid4().hex[:8]}", "test-absent"
    )
    with pytest.raises(catalog.CatalogError, match="llmstream infra up"):
        await asyncio.wait_for(follower.run(), T)
