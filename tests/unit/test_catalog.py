"""The model catalog: merging replicas' listings, the fold (expiry, tombstones, bad records) and
the announce loop, with in-memory fakes of the producer and the model servers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import grpc
import pytest

from llmstream import catalog
from llmstream.v1 import catalog_pb2, model_service_pb2, model_service_pb2_grpc

Info = model_service_pb2.ModelInfo


def served(
    name: str, max_tokens: int = 1024, servers: Sequence[str] = ("ms:1",)
) -> catalog.ServedModel:
    info = Info(
        name=name, version="v1", engine="synthetic", max_context=2048, max_tokens=max_tokens
    )
    return catalog.ServedModel(info, tuple(servers))


def record(
    name: str, at_ms: int, *, interval_ms: int = 1000, max_tokens: int = 1024
) -> tuple[bytes, bytes]:
    ann = catalog.announcement(
        served(name, max_tokens), announcer_id="w-1", interval_ms=interval_ms, now_ms=at_ms
    )
    return catalog.key(name), catalog.encode(ann)


# -- merge ------------------------------------------------------------------------------------


def test_merge_takes_the_tightest_limits_and_the_majority_version() -> None:
    merged = catalog.merge(
        {
            "ms:2": [Info(name="a", version="v2", engine="llamacpp", max_context=4096,
                          max_tokens=2048, max_concurrency=2)],
            "ms:1": [
                Info(name="a", version="v1", engine="llamacpp", max_context=2048, max_tokens=0,
                     max_concurrency=2),
                Info(name="b", version="x", engine="synthetic", max_tokens=64, max_concurrency=8),
            ],
            "ms:3": [Info(name="a", version="v2", engine="llamacpp", max_context=8192,
                          max_tokens=1024, max_concurrency=4)],
        }
    )  # fmt: skip
    assert [m.info.name for m in merged] == ["a", "b"]
    a = merged[0]
    assert (a.info.max_context, a.info.max_tokens, a.info.max_concurrency) == (2048, 1024, 8)
    assert a.info.version == "v2"  # two replicas of three
    assert a.model_servers == ("ms:1", "ms:2", "ms:3")
    assert merged[1].model_servers == ("ms:1",)


def test_merge_breaks_version_ties_the_same_way_everywhere() -> None:
    one = catalog.merge(
        {"x:1": [Info(name="a", version="v1")], "x:2": [Info(name="a", version="v2")]}
    )
    other = catalog.merge(
        {"x:2": [Info(name="a", version="v2")], "x:1": [Info(name="a", version="v1")]}
    )
    assert one[0].info.version == other[0].info.version == "v2"


# -- the fold ---------------------------------------------------------------------------------


def test_catalog_serves_announced_models_until_three_intervals_pass() -> None:
    cat = catalog.Catalog()
    cat.apply(*record("b", 10_000))
    cat.apply(*record("a", 10_000, max_tokens=512))
    assert [m.name for m in cat.models(10_500)] == ["a", "b"]
    found = cat.get("a", 12_999)
    assert found is not None
    assert (found.max_tokens, found.max_context, found.announcer_id) == (512, 2048, "w-1")
    assert found.model_servers == ("ms:1",)
    assert cat.get("a", 13_000) is None  # 3 x 1000 ms after the announcement
    assert cat.models(13_000) == []
    last = cat.last_known("a")
    assert last is not None and last.name == "a"
    assert cat.last_known("never") is None


def test_a_reannouncement_extends_and_updates_the_entry() -> None:
    cat = catalog.Catalog()
    cat.apply(*record("a", 10_000, max_tokens=512))
    cat.apply(*record("a", 12_000, max_tokens=256))
    entry = cat.get("a", 14_500)
    assert entry is not None and entry.max_tokens == 256


def test_the_last_record_in_log_order_wins_like_compaction() -> None:
    """A skewed clock must not pin an entry: log order, not timestamps, decides."""
    cat = catalog.Catalog()
    cat.apply(*record("a", 20_000, max_tokens=512))
    cat.apply(*record("a", 19_000, max_tokens=256))
    entry = cat.last_known("a")
    assert entry is not None and entry.max_tokens == 256


def test_a_tombstone_retires_the_model_at_once() -> None:
    cat = catalog.Catalog()
    cat.apply(*record("a", 10_000))
    cat.apply(catalog.key("a"), None)
    assert cat.get("a", 10_001) is None and cat.last_known("a") is None
    cat.apply(None, None)  # keyless tombstone: nothing to retire
    cat.apply(*record("a", 11_000))  # announced again later: back
    assert cat.get("a", 11_001) is not None


def test_unusable_records_are_skipped_and_counted() -> None:
    cat = catalog.Catalog()
    newer = catalog_pb2.ModelAnnounced(schema_version=catalog.SCHEMA_VERSION + 1)
    newer.model.name = "a"
    cat.apply(b"a", b"\xff\xff not protobuf")
    cat.apply(b"a", newer.SerializeToString())
    cat.apply(b"a", catalog_pb2.ModelAnnounced(schema_version=1).SerializeToString())  # no name
    cat.apply(b"other", record("a", 10_000)[1])  # key is not the model name
    assert cat.skipped == 4
    assert cat.last_known("a") is None


def test_encode_refuses_an_announcement_without_a_model() -> None:
    with pytest.raises(ValueError, match="no model name"):
        catalog.encode(catalog_pb2.ModelAnnounced(schema_version=1))


# -- announcing -------------------------------------------------------------------------------


class FakeProducer:
    """What `announce_once` uses of AIOKafkaProducer: `send` -> a future of the ack."""

    def __init__(self, wanted: int) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.wanted = wanted
        self.got_wanted = asyncio.Event()

    async def send(self, topic: str, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        self.records.append((topic, key, value))
        if len(self.records) >= self.wanted:
            self.got_wanted.set()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_announce_loop_survives_a_failed_round_and_feeds_the_fold() -> None:
    producer = FakeProducer(wanted=4)  # two successful rounds
    calls = 0

    async def list_models() -> list[catalog.ServedModel]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("model servers not up yet")
        return [served("a", servers=("ms:1", "ms:2")), served("b")]

    task = asyncio.create_task(
        catalog.announce_loop(cast(Any, producer), "t.models", list_models, 0.02, "worker-7")
    )
    await asyncio.wait_for(producer.got_wanted.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {t for t, _, _ in producer.records} == {"t.models"}
    assert [k for _, k, _ in producer.records[:4]] == [b"a", b"b", b"a", b"b"]
    cat = catalog.Catalog()
    for _, k, v in producer.records:
        cat.apply(k, v)
    a = cat.last_known("a")
    assert a is not None
    assert (a.announcer_id, a.interval_ms, a.model_servers) == ("worker-7", 20, ("ms:1", "ms:2"))
    assert [m.name for m in cat.models(a.announced_at_ms)] == ["a", "b"]


class FakeStub:
    def __init__(self, answer: list[Info] | None) -> None:
        self.answer = answer

    async def ListModels(
        self, request: model_service_pb2.ListModelsRequest, **options: float
    ) -> model_service_pb2.ListModelsResponse:
        if self.answer is None:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
            )
        return model_service_pb2.ListModelsResponse(models=self.answer)


async def test_list_served_models_leaves_out_replicas_that_do_not_answer() -> None:
    stubs = {
        "ms:1": FakeStub([Info(name="a", max_tokens=100)]),
        "ms:2": FakeStub(None),
        "ms:3": FakeStub([Info(name="a", max_tokens=50)]),
    }
    result = await catalog.list_served_models(
        cast(dict[str, model_service_pb2_grpc.ModelServiceStub], stubs)
    )
    assert len(result) == 1
    assert result[0].info.max_tokens == 50
    assert result[0].model_servers == ("ms:1", "ms:3")
