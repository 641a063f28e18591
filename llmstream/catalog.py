"""The model catalog: which models the deployment serves and their limits, event-sourced.

Workers list their model servers' models (`ModelService.ListModels`) every interval and announce
each model on a compacted topic keyed by model name (`announce_loop`). Gateways read that topic
from the beginning and keep following it (`CatalogFollower`), folding the records into a
`Catalog`. The last record of a model in log order wins, as compaction keeps it; an entry not
re-announced within `EXPIRE_INTERVALS` of its announcer's interval is no longer served (every
replica that served it is gone or unloaded it); a tombstone (null value) removes it at once.
Expiry compares the announcer's clock with the reader's: skew well under an interval is fine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf.message import DecodeError as _ProtobufDecodeError

from llmstream import config, kafka, telemetry, topics
from llmstream.v1 import catalog_pb2, model_service_pb2, model_service_pb2_grpc

log = logging.getLogger("llmstream.catalog")

SCHEMA_VERSION = 1
# Missed announcements after which a model is dropped: one lost round (a slow ListModels, a
# broker hiccup) must not make a served model disappear.
EXPIRE_INTERVALS = 3


class CatalogError(RuntimeError):
    """The catalog topic cannot be read (missing topic); the message says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One served model as the catalog knows it."""

    name: str
    version: str
    engine: str
    max_context: int  # tokens of prompt + completion; 0: unknown
    max_tokens: int  # upper bound for max_tokens; 0: unknown
    max_concurrency: int
    model_servers: tuple[str, ...]
    announcer_id: str
    announced_at_ms: int
    interval_ms: int

    @property
    def expires_at_ms(self) -> int:
        return self.announced_at_ms + EXPIRE_INTERVALS * self.interval_ms


@dataclass(frozen=True)
class ServedModel:
    """A model as one announcer sees it: merged limits and the replicas serving it."""

    info: model_service_pb2.ModelInfo
    model_servers: tuple[str, ...]


# -- records ------------------------------------------------------------------------------------


def announcement(
    served: ServedModel, *, announcer_id: str, interval_ms: int, now_ms: int | None = None
) -> catalog_pb2.ModelAnnounced:
    ann = catalog_pb2.ModelAnnounced(
        schema_version=SCHEMA_VERSION,
        announcer_id=announcer_id,
        interval_ms=interval_ms,
        model_servers=sorted(served.model_servers),
    )
    ann.model.CopyFrom(served.info)
    ann.announced_at.FromMilliseconds(time.time_ns() // 1_000_000 if now_ms is None else now_ms)
    return ann


def key(model: str) -> bytes:
    return model.encode()


def encode(ann: catalog_pb2.ModelAnnounced) -> bytes:
    if not ann.model.name:
        raise ValueError("announcement has no model name")
    return ann.SerializeToString()


def decode(value: bytes) -> catalog_pb2.ModelAnnounced:
    """A record value -> announcement, or ValueError with the reason."""
    ann = catalog_pb2.ModelAnnounced()
    try:
        ann.ParseFromString(value)
    except _ProtobufDecodeError as exc:
        raise ValueError(f"not a protobuf ModelAnnounced: {exc}") from None
    if ann.schema_version == 0:
        raise ValueError("schema_version missing (not a ModelAnnounced)")
    if ann.schema_version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {ann.schema_version} is newer than {SCHEMA_VERSION}")
    if not ann.model.name:
        raise ValueError("model name missing")
    return ann


def entry(ann: catalog_pb2.ModelAnnounced) -> ModelEntry:
    m = ann.model
    return ModelEntry(
        name=m.name,
        version=m.version,
        engine=m.engine,
        max_context=m.max_context,
        max_tokens=m.max_tokens,
        max_concurrency=m.max_concurrency,
        model_servers=tuple(ann.model_servers),
        announcer_id=ann.announcer_id,
        announced_at_ms=int(ann.announced_at.ToMilliseconds()),
        interval_ms=ann.interval_ms,
    )


# -- the fold -----------------------------------------------------------------------------------


class Catalog:
    """Announcements folded into the served models. Pure: time is an argument."""

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}
        # Records that could not be used (undecodable, newer schema, key != model name).
        self.skipped = 0

    def apply(self, record_key: bytes | None, value: bytes | None) -> None:
        """Fold one record of the catalog topic, in log order."""
        if value is None:  # tombstone: the model is retired now
            if record_key is not None:
                self._entries.pop(record_key.decode("utf-8", "replace"), None)
            return
        try:
            ann = decode(value)
        except ValueError as exc:
            self.skipped += 1
            log.warning("catalog record skipped", extra=telemetry.fields(reason=str(exc)))
            return
        if record_key is not None and record_key != key(ann.model.name):
            # A key that is not the model name would escape compaction's one-record-per-model.
            self.skipped += 1
            log.warning(
                "catalog record skipped",
                extra=telemetry.fields(reason=f"key is not the model name {ann.model.name!r}"),
            )
            return
        self._entries[ann.model.name] = entry(ann)

    def get(self, name: str, now_ms: int) -> ModelEntry | None:
        """The model if it is served now (announced within its expiry)."""
        found = self._entries.get(name)
        return found if found is not None and now_ms < found.expires_at_ms else None

    def last_known(self, name: str) -> ModelEntry | None:
        """The model's last announcement, expired or not: tells a model that was served and
        is gone (unavailable) from one that never was (not found)."""
        return self._entries.get(name)

    def models(self, now_ms: int) -> list[ModelEntry]:
        """Every model served now, by name."""
        return sorted(
            (e for e in self._entries.values() if now_ms < e.expires_at_ms), key=lambda e: e.name
        )


# -- announcing (workers) -----------------------------------------------------------------------


def merge(listings: Mapping[str, Sequence[model_service_pb2.ModelInfo]]) -> list[ServedModel]:
    """Replica (host:port) -> its ListModels answer, merged per model name: the smallest
    max_context and max_tokens (an admitted request must fit whichever replica runs it; 0 is
    unknown and ignored), the sum of max_concurrency, the version and engine most replicas
    serve (ties: the last by name, so every announcer picks the same)."""
    by_name: dict[str, list[tuple[str, model_service_pb2.ModelInfo]]] = {}
    for replica, infos in listings.items():
        for info in infos:
            by_name.setdefault(info.name, []).append((replica, info))
    out = []
    for name in sorted(by_name):
        infos = [i for _, i in by_name[name]]
        merged = model_service_pb2.ModelInfo(
            name=name,
            version=_most_common([i.version for i in infos]),
            engine=_most_common([i.engine for i in infos]),
            max_context=min((i.max_context for i in infos if i.max_context), default=0),
            max_tokens=min((i.max_tokens for i in infos if i.max_tokens), default=0),
            max_concurrency=sum(i.max_concurrency for i in infos),
        )
        out.append(ServedModel(merged, tuple(sorted(r for r, _ in by_name[name]))))
    return out


def _most_common(values: list[str]) -> str:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


async def list_served_models(
    stubs: Mapping[str, model_service_pb2_grpc.ModelServiceStub], timeout_s: float = 2.0
) -> list[ServedModel]:
    """ListModels on every replica at once, merged (`merge`). A replica that does not answer
    is left out: its models expire from the catalog unless another replica serves them."""

    async def one(replica: str) -> Sequence[model_service_pb2.ModelInfo]:
        try:
            resp = await stubs[replica].ListModels(
                model_service_pb2.ListModelsRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            log.info(
                "model server did not list its models",
                extra=telemetry.fields(model_server=replica, code=exc.code().name),
            )
            return []
        return list(resp.models)

    replicas = sorted(stubs)
    answers = await asyncio.gather(*(one(r) for r in replicas))
    return merge(dict(zip(replicas, answers, strict=True)))


async def announce_once(
    producer: AIOKafkaProducer,
    topic: str,
    served: Sequence[ServedModel],
    *,
    announcer_id: str,
    interval_ms: int,
) -> None:
    """One record per model; returns when Kafka acknowledged all of them."""
    sends = [
        await producer.send(
            topic,
            key=key(s.info.name),
            value=encode(announcement(s, announcer_id=announcer_id, interval_ms=interval_ms)),
        )
        for s in served
    ]
    await asyncio.gather(*sends)


async def announce_loop(
    producer: AIOKafkaProducer,
    topic: str,
    list_models: Callable[[], Awaitable[Sequence[ServedModel]]],
    interval_s: float,
    announcer_id: str,
) -> None:
    """Announce what `list_models` returns every `interval_s`, until cancelled. A failed round
    is logged and the next one tries again: announcements are idempotent, and a model only
    expires after EXPIRE_INTERVALS missed rounds."""
    interval_ms = max(1, round(interval_s * 1000))
    while True:
        started = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
            # arrives as the inner call completes, and the loop would never stop.
            async with asyncio.timeout(interval_s):
                served = await list_models()
                await announce_once(
                    producer, topic, served, announcer_id=announcer_id, interval_ms=interval_ms
                )
        except Exception as exc:
            log.warning("model announcement failed", extra=telemetry.fields(error=repr(exc)))
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


async def announce_served_models(
    producer: AIOKafkaProducer,
    stubs: Mapping[str, model_service_pb2_grpc.ModelServiceStub],
    announcer_id: str,
) -> None:
    """The worker's announcer as configured (LLMSTREAM_TOPIC_MODELS,
    LLMSTREAM_CATALOG_ANNOUNCE_S); run it as a supervised task beside the worker's loops."""
    await announce_loop(
        producer,
        topics.models(),
        lambda: list_served_models(stubs),
        config.get_float("CATALOG_ANNOUNCE_S"),
        announcer_id,
    )


# -- following (gateways) -----------------------------------------------------------------------


class CatalogFollower:
    """Reads the catalog topic from the beginning into `catalog`, then follows it. `ready` is
    set once every record that existed when it started has been folded: before that, a model
    missing from the catalog may just not be read yet."""

    def __init__(
        self,
        conn: kafka.Connection,
        topic: str,
        client_id: str,
        *,
        catalog: Catalog | None = None,
        fetch_max_wait_ms: int = 500,
    ) -> None:
        self.conn = conn
        self.topic = topic
        self.client_id = client_id
        self.catalog = catalog if catalog is not None else Catalog()
        self.ready = asyncio.Event()
        # Catalog changes are rare: half a second of fetch latency costs nothing.
        self.fetch_max_wait_ms = fetch_max_wait_ms

    async def run(self) -> None:
        """Until cancelled; raises CatalogError when the topic does not exist."""
        consumer = kafka.reader(self.conn, self.client_id, fetch_max_wait_ms=self.fetch_max_wait_ms)
        try:
            await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT_S)
            tps = await self._partitions(consumer)
            consumer.assign(tps)
            await asyncio.wait_for(consumer.seek_to_beginning(*tps), kafka.CALL_TIMEOUT_S)
            ends = await kafka.end_offsets(consumer, tps)
            await self._mark_ready_at(consumer, ends)
            while True:
                # asyncio.timeout never swallows a cancel (Python 3.11's wait_for can).
                async with asyncio.timeout(kafka.CALL_TIMEOUT_S + 1):
                    batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        self.catalog.apply(record.key, record.value)
                await self._mark_ready_at(consumer, ends)
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            await asyncio.wait_for(consumer._client.force_metadata_update(), kafka.CALL_TIMEOUT_S)
            parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            raise CatalogError(
                f"model catalog topic {self.topic!r} does not exist: run `llmstream infra up` "
                "(or `llmstream infra init`), or set LLMSTREAM_TOPIC_MODELS"
            )
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    async def _mark_ready_at(self, consumer: AIOKafkaConsumer, ends: dict[Any, int]) -> None:
        if self.ready.is_set():
            return
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return
        self.ready.set()


def follower_from_env(client_id: str) -> CatalogFollower:
    """The gateway's follower of the configured catalog topic (LLMSTREAM_TOPIC_MODELS)."""
    return CatalogFollower(kafka.Connection.from_env(), topics.models(), client_id)
