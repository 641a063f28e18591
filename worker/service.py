"""The worker's async shell: Kafka prompts -> gRPC Generate -> keyed token events.

One consumer (group, manual commits) reads the prompts topic; each `submitted` becomes an
asyncio task that streams from a model server and produces `started`, coalesced
`token_delta`s (seq 1..n) and exactly one terminal event to the request's reply partition.
See docs/worker.md for the guarantees and how each is achieved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from llmstream import codec, telemetry, tracing
from llmstream.fold import RequestState, finish_reason_name, fold
from llmstream.tracing import Span, SpanKind, Status, StatusCode
from llmstream.v1 import common_pb2, events_pb2, model_service_pb2, model_service_pb2_grpc
from worker.coalesce import Coalescer
from worker.core import (
    INTERNAL,
    MODEL_UNAVAILABLE,
    RETRYABLE,
    Envelope,
    envelope_of,
    failure_code,
)
from worker.filters import Blocklist
from worker.metrics import WorkerMetrics
from worker.offsets import PartitionOffsets
from worker.routing import Router, backoff_s

log = logging.getLogger("worker")

FR = common_pb2.FinishReason


@dataclass
class Settings:
    bootstrap: str
    prompts_topic: str
    tokens_topic: str
    dlq_topic: str
    group: str
    worker_id: str
    model_servers: list[str]
    max_inflight: int = 256
    coalesce_ms: float = 5.0
    coalesce_bytes: int = 4096
    max_tokens: int = 0  # worker-side cap (0: none beyond the request's)
    default_timeout_ms: int = 300_000
    retries: int = 6
    backoff_base_ms: float = 100.0
    backoff_cap_ms: float = 2000.0
    drain_timeout_s: float = 20.0
    session_timeout_ms: int = 10_000
    blocklist: str = ""
    takeover_margin_ms: int = 60_000
    # PEM CA file of the model servers' TLS certificates ("system": the system store);
    # empty: plaintext gRPC.
    model_server_tls_ca: str = ""
    cancel_grace_s: float = 2.0


@dataclass
class Run:
    """One submitted request on this worker."""

    tp: TopicPartition
    offset: int
    record_ts: int
    submit: events_pb2.Event
    needs_lookup: bool
    # Set when the fetch that brought this prompt was cut at the in-flight bound, so records
    # behind it (a cancel) may not have been fetched yet: the start then waits until the cancel
    # lookahead has read the partition to its end once after `fetched_at` (monotonic).
    fetched_at: float | None = None
    prior: RequestState | None = None
    cancel_reason: str | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    emitter: Emitter | None = None
    tokens_span: Span | None = None  # `send <tokens>`: ended when the request leaves

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason or "cancelled"
            self.cancelled.set()


@dataclass
class _Outcome:
    """How one gRPC attempt ended."""

    finish: model_service_pb2.GenerateFinish | None = None
    own_reason: FR.ValueType | None = None  # a stop decided by the worker
    own_message: str = ""
    error: grpc.aio.AioRpcError | None = None
    attempt: int = 0  # attempt number after this stream (+1 if it produced `started`)


class Emitter:
    """Produces one request's events in order and coalesces its deltas.

    Every send goes through one lock, so events leave in call order (aiokafka appends to the
    partition's batch in `send` order). A delta that arrives while the previous event is not
    yet acknowledged waits in the coalescer; a timer (the coalescing delay) and the previous
    event's acknowledgement both trigger the flush, so the hot path creates no task per token.
    """

    def __init__(
        self,
        worker: Worker,
        run: Run,
        env: Envelope,
        last_seq: int,
        token_ids: list[int],
    ) -> None:
        s = worker.settings
        self._producer = worker.producer
        reply = run.submit.submitted.reply
        self.topic = reply.topic or s.tokens_topic
        self.partition = reply.partition
        self.env = env
        self.last_seq = last_seq
        self.token_ids = token_ids
        self.first_seq = last_seq  # what the log held before this worker's attempt
        self.first_token_count = len(token_ids)
        self.coalescer = Coalescer(s.coalesce_ms / 1000.0, s.coalesce_bytes)
        self._deltas = env.delta_encoder()
        self._key = run.request_id.encode()
        self._lock = asyncio.Lock()
        self._last: asyncio.Future[Any] | None = None
        self._futures: list[asyncio.Future[Any]] = []
        self._armed = False
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self.events = 0
        self.deltas_in = 0

    async def _send(self, event: events_pb2.Event) -> None:
        await self._send_raw(codec.encode(event), codec.headers(event))

    async def _send_raw(self, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        fut: asyncio.Future[Any] = await self._producer.send(
            self.topic, value=value, key=self._key, partition=self.partition, headers=headers
        )
        if len(self._futures) > 64:
            self._futures = [
                f for f in self._futures if not f.done() or f.cancelled() or f.exception()
            ]
        self._futures.append(fut)
        self._last = fut
        self.events += 1

    async def send(self, event: events_pb2.Event, *, gates: bool = True) -> None:
        """`gates=False`: the next delta does not wait for this event's acknowledgement
        (`started`: the first token follows it at once, often in the same batch, instead of
        an ack round trip later)."""
        async with self._lock:
            last = self._last
            await self._send(event)
            if not gates:
                self._last = last

    def previous_acked(self) -> bool:
        return self._last is None or self._last.done()

    async def push(self, text: str, token_ids: list[int]) -> None:
        """A model delta: sent at once if the pipeline is idle, else coalesced."""
        self.deltas_in += 1
        now = time.monotonic()
        self.coalescer.add(text, token_ids, now)
        if self.coalescer.due(now, self.previous_acked()):
            await self.flush()
        elif not self._armed:
            self._armed = True
            deadline = self.coalescer.deadline()
            assert deadline is not None
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - now), self._fire)
            if self._last is not None:
                self._last.add_done_callback(self._on_ack)

    def _on_ack(self, _: asyncio.Future[Any]) -> None:
        self._fire()

    def _fire(self) -> None:
        if not self._armed:
            return
        self._disarm()
        task = asyncio.ensure_future(self.flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def _disarm(self) -> None:
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> None:
        async with self._lock:
            self._disarm()
            if self.coalescer.empty:
                return
            text, ids, _ = self.coalescer.take()
            self.last_seq += 1
            self.token_ids.extend(ids)
            value = self._deltas.value(self.last_seq, text, ids)
            await self._send_raw(value, self._deltas.headers)

    async def settle(self) -> None:
        """Wait until every event produced so far is acknowledged (raises on failure)."""
        for task in list(self._flushes):
            await task
        pending = self._futures
        self._futures = []
        for fut in pending:
            await fut

    def close(self) -> None:
        self._disarm()
        for task in self._flushes:
            task.cancel()

    def usage(self, prompt_tokens: int) -> common_pb2.Usage:
        return common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(self.token_ids))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker.on_assigned(set(assigned))


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.router = Router(settings.model_servers)
        self.blocklist = Blocklist.parse(settings.blocklist)
        self.runs: dict[str, Run] = {}
        self.offsets: dict[TopicPartition, PartitionOffsets] = {}
        self.takeover_until: dict[TopicPartition, int] = {}
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, model_service_pb2_grpc.ModelServiceStub] = {}
        self._versions: dict[tuple[str, str], str] = {}
        self._versions_at: dict[str, float] = {}
        self._abandoning: set[str] = set()
        self._partitions: dict[str, int] = {}
        # Requests this worker ended recently: a repeated submit of one is not run again.
        self._recent: OrderedDict[str, None] = OrderedDict()
        # Cancels read ahead of their submit (request id -> reason).
        self._early_cancels: OrderedDict[str, str] = OrderedDict()
        self._lookahead_from: dict[TopicPartition, int | None] = {}
        # Monotonic time at which the lookahead last stood at the end of each partition.
        self._lookahead_synced: dict[TopicPartition, float] = {}
        self.fatal: BaseException | None = None
        self.metrics = WorkerMetrics(lambda: len(self.runs))
        self.stats: dict[str, int] = {
            "prompts": 0,
            "completed": 0,
            "failed": 0,
            "cancelled_before_start": 0,
            "skipped_terminal": 0,
            "takeovers": 0,
            "retries": 0,
            "dlq": 0,
            "events": 0,
            "model_deltas": 0,
        }
        s = settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap,
            group_id=s.group,
            client_id=s.worker_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # A long poll: the broker answers as soon as a prompt arrives, so this only bounds
            # empty fetches (10 ms cost 5% of a core per idle worker in polling).
            fetch_max_wait_ms=100,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(1000, s.session_timeout_ms // 4),
            max_poll_interval_ms=300_000,
        )
        self.reader = _side_reader(s, "takeover")
        # Reads the assigned prompt partitions ahead of the group consumer, for cancels only:
        # a paused partition (in-flight bound) must not hold back the cancel of a running
        # request, and a cancel read ahead of its submit keeps that request from starting.
        self.lookahead = _side_reader(s, "cancels")
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap,
            client_id=s.worker_id,
            enable_idempotence=True,
            acks="all",
            # No linger: an event leaves at once when the producer is idle (2 ms less per token
            # at low load); under load, aiokafka's one request in flight per broker batches the
            # events that arrive meanwhile anyway.
            linger_ms=0,
            # aiokafka keeps one batch per partition in flight; a larger batch lets the
            # events of many requests wait in it instead of in `send` (less CPU per event).
            max_batch_size=512 * 1024,
            # How long a batch waits for a partition leader before it fails, which stops the
            # worker (see _execute). aiokafka's 40 s default is less than a broker restart can
            # take on a busy machine (`llmstream chaos`: stop + 10 s + start took 43 s once).
            request_timeout_ms=120_000,
        )

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        s = self.settings
        await self.producer.start()
        await self.reader.start()
        await self.lookahead.start()
        cancels = asyncio.create_task(self._cancel_loop())
        try:
            self.consumer.subscribe([s.prompts_topic], listener=_Listener(self))
            await self.consumer.start()
            log.info(
                "worker started",
                extra=telemetry.fields(
                    worker_id=s.worker_id, group=s.group, model_servers=s.model_servers
                ),
            )
            committer = asyncio.create_task(self._commit_loop())
            try:
                await self._fetch_loop()
                await self._drain()
            finally:
                committer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await committer
                await self._commit()
                await self.consumer.stop()
        finally:
            cancels.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cancels
            await self.lookahead.stop()
            await self.reader.stop()
            await self.producer.stop()
            for ch in self._channels.values():
                await ch.close()
            log.info("worker stopped", extra=telemetry.fields(**self.stats))

    def request_stop(self) -> None:
        self.stopping.set()

    async def _drain(self) -> None:
        tasks = [r.task for r in self.runs.values() if r.task is not None]
        log.info("draining", extra=telemetry.fields(in_flight=len(tasks)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
            if pending:
                log.info(
                    "drain timeout: leaving requests uncommitted",
                    extra=telemetry.fields(n=len(pending)),
                )
            await self._abandon(list(self.runs.values()))
        with contextlib.suppress(KafkaError):
            await self.producer.flush()

    async def _abandon(self, runs: list[Run]) -> None:
        """Stop runs without a terminal event; their prompts stay uncommitted for takeover."""
        tasks = []
        for run in runs:
            self._abandoning.add(run.request_id)
            if run.task is not None and not run.task.done():
                run.task.cancel()
                tasks.append(run.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            self.runs.pop(run.request_id, None)
            self._abandoning.discard(run.request_id)

    # ---------------------------------------------------------------- rebalance

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            runs = [r for r in self.runs.values() if r.tp in revoked]
            if runs:
                log.info("partitions revoked: stopping runs", extra=telemetry.fields(n=len(runs)))
            await self._abandon(runs)
            with contextlib.suppress(KafkaError):
                await self.producer.flush()
            await self._commit()
            for tp in revoked:
                self.offsets.pop(tp, None)
                self.takeover_until.pop(tp, None)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            if not assigned:
                return
            ends = await self.consumer.end_offsets(list(assigned))
            for tp in assigned:
                self.offsets[tp] = PartitionOffsets()
                self.takeover_until[tp] = ends.get(tp, 0)
                self._lookahead_from[tp] = await self.consumer.committed(tp)
            log.info(
                "partitions assigned",
                extra=telemetry.fields(partitions=sorted(tp.partition for tp in assigned)),
            )

    # ---------------------------------------------------------------- consuming

    def _update_pause(self) -> None:
        assignment = self.consumer.assignment()
        if not assignment:
            return
        full = len(self.runs) >= self.settings.max_inflight
        paused = self.consumer.paused()
        if full:
            to_pause = [tp for tp in assignment if tp not in paused]
            if to_pause:
                self.consumer.pause(*to_pause)
        elif paused:
            self.consumer.resume(*paused)

    async def _fetch_loop(self) -> None:
        while not self.stopping.is_set():
            self._update_pause()
            room = max(1, self.settings.max_inflight - len(self.runs))
            batch = await self.consumer.getmany(timeout_ms=100, max_records=room)
            if not batch or self.stopping.is_set():
                continue
            truncated = sum(len(records) for records in batch.values()) >= room
            async with self._lock:
                await self._handle_batch(batch, time.monotonic() if truncated else None)

    async def _handle_batch(
        self, batch: dict[TopicPartition, list[Any]], truncated_at: float | None = None
    ) -> None:
        new_runs: list[Run] = []
        for tp, records in batch.items():
            offsets = self.offsets.get(tp)
            if offsets is None:  # revoked while fetched
                continue
            for rec in records:
                offsets.add(rec.offset)
                run = await self._handle_record(tp, rec)
                if run is not None:
                    run.fetched_at = truncated_at
                    new_runs.append(run)
        lookups = [r for r in new_runs if r.needs_lookup]
        if lookups:
            await self._takeover_lookup(lookups)
        for run in new_runs:
            if run.request_id in self.runs and self.runs[run.request_id] is run:
                run.task = asyncio.create_task(self._execute(run), name=run.request_id)

    async def _handle_record(self, tp: TopicPartition, rec: Any) -> Run | None:
        try:
            event = codec.decode(rec.value)
        except codec.DecodeError as exc:
            await self._dead_letter(tp, rec, str(exc))
            return None
        kind = event.WhichOneof("body")
        if kind == "submitted":
            problem = await self._invalid_submit(event)
            if problem is not None:
                await self._dead_letter(tp, rec, problem)
                return None
            if event.request_id in self.runs or event.request_id in self._recent:
                # A repeated submit of a running or just finished request: nothing to do.
                self.offsets[tp].done(rec.offset)
                return None
            self.stats["prompts"] += 1
            run = Run(
                tp=tp,
                offset=rec.offset,
                record_ts=rec.timestamp,
                submit=event,
                needs_lookup=rec.offset < self.takeover_until.get(tp, 0),
            )
            self.runs[event.request_id] = run
            early = self._early_cancels.pop(event.request_id, None)
            if early is not None:
                run.cancel(early)
            return run
        if kind == "cancel_requested":
            existing = self.runs.get(event.request_id)
            if existing is not None:
                existing.cancel(event.cancel_requested.reason)
            self._early_cancels.pop(event.request_id, None)
        # Cancels and anything else on the prompts topic need no further work.
        self.offsets[tp].done(rec.offset)
        return None

    async def _cancel_loop(self) -> None:
        """Apply cancels as soon as they are in the log (see `self.lookahead`)."""
        assigned: set[TopicPartition] = set()
        while True:
            want = set(self.offsets)
            if want != assigned:
                self.lookahead.assign(list(want))
                for tp in want - assigned:
                    start = self._lookahead_from.get(tp)
                    if start is None:
                        await self.lookahead.seek_to_beginning(tp)
                    else:
                        self.lookahead.seek(tp, start)
                assigned = want
            if not assigned:
                self.metrics.prompt_lag = {}
                await asyncio.sleep(0.1)
                continue
            try:
                batch = await self.lookahead.getmany(timeout_ms=200)
            except KafkaError as exc:
                log.warning("cancel lookahead failed", extra=telemetry.fields(error=repr(exc)))
                await asyncio.sleep(1.0)
                continue
            for tp, records in batch.items():
                if tp not in self.offsets:
                    continue
                for rec in records:
                    if b"cancel_requested" not in (
                        v for k, v in rec.headers or () if k == "event-type"
                    ):
                        continue
                    try:
                        event = codec.decode(rec.value)
                    except codec.DecodeError:
                        continue
                    if event.WhichOneof("body") != "cancel_requested":
                        continue
                    self._early_cancel(event.request_id, event.cancel_requested.reason)
            now = time.monotonic()
            lag: dict[tuple[str, int], int] = {}
            for tp in assigned:
                high = self.lookahead.highwater(tp)
                if high is not None and await self.lookahead.position(tp) >= high:
                    self._lookahead_synced[tp] = now
                offsets = self.offsets.get(tp)
                if high is not None and offsets is not None:
                    done = offsets.last_committed
                    done = self._lookahead_from.get(tp) if done is None else done
                    lag[(tp.topic, tp.partition)] = max(0, high - (done or 0))
            self.metrics.prompt_lag = lag

    async def _await_lookahead(self, run: Run, within_s: float = 0.5) -> None:
        """Wait (bounded) until the cancel lookahead has read `run`'s partition to its end at
        least once since the prompt was fetched, so a cancel already in the log is applied
        before the request starts."""
        if run.fetched_at is None:
            return
        deadline = time.monotonic() + within_s
        while self._lookahead_synced.get(run.tp, 0.0) < run.fetched_at:
            if run.cancel_reason is not None or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.005)

    def _early_cancel(self, request_id: str, reason: str) -> None:
        run = self.runs.get(request_id)
        if run is not None:
            run.cancel(reason)
        elif request_id not in self._recent:
            self._early_cancels[request_id] = reason
            if len(self._early_cancels) > 65536:
                self._early_cancels.popitem(last=False)

    async def _invalid_submit(self, event: events_pb2.Event) -> str | None:
        """Why a submit cannot be served at all (it goes to the dead-letter topic), or None."""
        reply = event.submitted.reply
        topic = reply.topic or self.settings.tokens_topic
        if topic != self.settings.tokens_topic:
            # Gateways reply on the deployment's tokens topic. Any other name would cost a
            # metadata wait (10 s, all prompts stalled) per record: refused at once.
            return f"reply topic {topic!r} is not the tokens topic {self.settings.tokens_topic!r}"
        if topic not in self._partitions:
            try:
                parts = await asyncio.wait_for(self.producer.partitions_for(topic), 10.0)
            except (KafkaError, TimeoutError):
                return f"reply topic {topic!r} is unknown"
            self._partitions[topic] = len(parts or ())
        if not 0 <= reply.partition < self._partitions[topic]:
            return f"reply partition {reply.partition} does not exist in topic {topic!r}"
        return None

    async def _dead_letter(self, tp: TopicPartition, rec: Any, reason: str) -> None:
        headers = list(rec.headers or ())
        headers += [
            ("dlq-reason", reason.encode()),
            ("dlq-source", f"{tp.topic}/{tp.partition}/{rec.offset}".encode()),
            ("dlq-producer", self.settings.worker_id.encode()),
        ]
        fut = await self.producer.send(
            self.settings.dlq_topic, value=rec.value, key=rec.key, headers=headers
        )
        await fut
        self.stats["dlq"] += 1
        self.metrics.dead_letters.add(1)
        log.warning(
            "poison record sent to the dead-letter topic",
            extra=telemetry.fields(
                reason=reason, topic=tp.topic, partition=tp.partition, offset=rec.offset
            ),
        )
        self.offsets[tp].done(rec.offset)

    async def _takeover_lookup(self, runs: list[Run]) -> None:
        """Fold what earlier owners already produced for these requests (the log is the state)."""
        by_tp: dict[TopicPartition, list[Run]] = {}
        for run in runs:
            reply = run.submit.submitted.reply
            tp = TopicPartition(reply.topic or self.settings.tokens_topic, reply.partition)
            by_tp.setdefault(tp, []).append(run)
        for tp, group in by_tp.items():
            wanted = {r.request_id.encode(): r for r in group}
            since = max(0, min(r.record_ts for r in group) - self.settings.takeover_margin_ms)
            self.reader.assign([tp])
            found = await self.reader.offsets_for_times({tp: since})
            end = (await self.reader.end_offsets([tp]))[tp]
            hit = found.get(tp)
            start = hit.offset if hit is not None else end
            states: dict[bytes, RequestState] = {}
            if start < end:
                self.reader.seek(tp, start)
                position = start
                give_up = time.monotonic() + 60.0
                while position < end:
                    if time.monotonic() > give_up:
                        # Continuing blind could duplicate tokens: stop the worker instead.
                        raise RuntimeError(f"takeover: cannot read {tp} up to offset {end}")
                    data = await self.reader.getmany(tp, timeout_ms=1000)
                    for rec in data.get(tp, []):
                        if rec.offset >= end:
                            break
                        if rec.key in wanted:
                            try:
                                event = codec.decode(rec.value)
                            except codec.DecodeError:
                                continue
                            states[rec.key] = fold(states.get(rec.key), event)
                    position = await self.reader.position(tp)
            for key, run in wanted.items():
                run.prior = states.get(key)
            log.info(
                "takeover lookup",
                extra=telemetry.fields(
                    reply_partition=tp.partition, requests=len(group), with_events=len(states)
                ),
            )

    # ---------------------------------------------------------------- committing

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self._commit()

    async def _commit(self) -> None:
        assignment = self.consumer.assignment()
        todo = {}
        for tp, offsets in self.offsets.items():
            if tp not in assignment:
                continue
            offset = offsets.to_commit()
            if offset is not None:
                todo[tp] = offset
        if not todo:
            return
        try:
            await self.consumer.commit(todo)
        except KafkaError as exc:
            log.warning("commit failed", extra=telemetry.fields(error=repr(exc)))
            return
        for tp, offset in todo.items():
            if tp in self.offsets:
                self.offsets[tp].committed(offset)

    def _finished(self, run: Run) -> None:
        self._recent[run.request_id] = None
        if len(self._recent) > 65536:
            self._recent.popitem(last=False)
        offsets = self.offsets.get(run.tp)
        if offsets is not None and self.runs.get(run.request_id) is run:
            offsets.done(run.offset)
        if self.runs.get(run.request_id) is run:
            del self.runs[run.request_id]

    # ---------------------------------------------------------------- one request

    def _stub(self, replica: str) -> model_service_pb2_grpc.ModelServiceStub:
        stub = self._stubs.get(replica)
        if stub is None:
            options = [
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.max_receive_message_length", 16 << 20),
            ]
            ca = self.settings.model_server_tls_ca
            if ca:
                roots = None if ca == "system" else Path(ca).read_bytes()
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
                channel = grpc.aio.secure_channel(replica, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(replica, options=options)
            self._channels[replica] = channel
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            self._stubs[replica] = stub
        return stub

    async def _model_version(self, replica: str, model: str) -> str:
        """Version of a replica's model for `started` events (cached 30 s, failures too)."""
        now = time.monotonic()
        if now - self._versions_at.get(replica, -1e9) > 30.0:
            self._versions_at[replica] = now
            try:
                resp = await self._stub(replica).ListModels(
                    model_service_pb2.ListModelsRequest(), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return ""
            for info in resp.models:
                self._versions[(replica, info.name)] = info.version
        return self._versions.get((replica, model), "")

    async def _execute(self, run: Run) -> None:
        submit = run.submit
        with (
            self._process_span(run),
            telemetry.log_context(request_id=run.request_id, tenant_id=submit.tenant_id),
        ):
            try:
                await self._execute_inner(run)
                if run.emitter is not None:
                    run.emitter.close()
            except asyncio.CancelledError:
                if run.emitter is not None:
                    run.emitter.close()
                if run.request_id not in self._abandoning:
                    raise
            except KafkaError as exc:
                # An event may be missing from the log: nothing this worker produces for the
                # request can be trusted any more. Stop the worker (exit 1) and let the next
                # owner continue from what the log really holds.
                log.error(
                    "producing failed; stopping the worker", extra=telemetry.fields(error=repr(exc))
                )
                self.fatal = exc
                self.request_stop()
            except Exception as exc:
                log.exception("request crashed")
                await self._crashed(run, exc)

    @contextlib.contextmanager
    def _process_span(self, run: Run) -> Iterator[None]:
        """The worker's span of one request, continuing the trace the prompt event carries."""
        submit = run.submit
        parent = tracing.context_of(submit.trace.traceparent, submit.trace.tracestate)
        with tracing.tracer().start_as_current_span(
            f"process {run.tp.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=tracing.kafka_attributes(
                "process",
                run.tp.topic,
                partition=run.tp.partition,
                key=run.request_id,
                offset=run.offset,
                group=self.settings.group,
            ),
        ):
            try:
                yield
            finally:
                if run.tokens_span is not None:
                    run.tokens_span.end()

    def _traced(self, run: Run, env: Envelope, topic: str, partition: int) -> Envelope:
        """Starts the span of this worker's token events; every event it produces for the
        request carries that span's context (the gateway and aggregator continue from it)."""
        span = tracing.tracer().start_span(
            f"send {topic}",
            kind=SpanKind.PRODUCER,
            attributes=tracing.kafka_attributes(
                "send", topic, partition=partition, key=run.request_id
            ),
        )
        run.tokens_span = span
        traceparent, tracestate = tracing.trace_context_of(span)
        return dataclasses.replace(env, traceparent=traceparent, tracestate=tracestate)

    async def _crashed(self, run: Run, exc: Exception) -> None:
        """A bug: end the request with `failed` internal rather than block its partition."""
        em = run.emitter
        if em is None:
            em = Emitter(self, run, envelope_of(run.submit, self.settings.worker_id), 0, [])
        try:
            await em.flush()
            event = em.env.failed(
                INTERNAL,
                f"worker error: {type(exc).__name__}",
                em.usage(run.submit.submitted.estimated_prompt_tokens),
                em.last_seq,
            )
            await self._terminal(run, em, event)
        except Exception:
            log.exception("could not report the crash; request left uncommitted")
            self.runs.pop(run.request_id, None)

    async def _execute_inner(self, run: Run) -> None:
        s = self.settings
        prior = run.prior
        if prior is not None and prior.terminal:
            self.stats["skipped_terminal"] += 1
            self.metrics.requests.add(1, {"outcome": "skipped_terminal"})
            self._finished(run)
            return
        reply = run.submit.submitted.reply
        env = self._traced(
            run,
            envelope_of(run.submit, s.worker_id),
            reply.topic or s.tokens_topic,
            reply.partition,
        )
        em = Emitter(
            self,
            run,
            env,
            last_seq=prior.last_seq if prior else 0,
            token_ids=list(prior.token_ids) if prior else [],
        )
        run.emitter = em
        attempt = prior.attempts if prior else 0
        if prior is not None and (prior.attempts or prior.last_seq):
            self.stats["takeovers"] += 1
            self.metrics.takeovers.add(1)
        sub = run.submit.submitted
        prompt_tokens = sub.estimated_prompt_tokens

        await self._await_lookahead(run)
        if run.cancel_reason is not None:
            self.stats["cancelled_before_start"] += 1
            await self._terminal(
                run,
                em,
                env.completed(
                    FR.FINISH_REASON_CANCELLED,
                    em.usage(prompt_tokens),
                    None,
                    em.last_seq,
                    f"cancelled before start: {run.cancel_reason}",
                ),
            )
            return

        timeout_ms = sub.timeout_ms or s.default_timeout_ms
        elapsed_ms = 0
        if run.submit.HasField("event_time"):  # the limit counts from submission
            elapsed_ms = max(0, time.time_ns() // 1_000_000 - codec.event_time_ms(run.submit))
        deadline = time.monotonic() + max(0, timeout_ms - elapsed_ms) / 1000.0
        max_tokens = sub.max_tokens
        if s.max_tokens and (not max_tokens or max_tokens > s.max_tokens):
            max_tokens = s.max_tokens

        retries = 0
        exclude: set[str] = set()
        while True:
            replica = self.router.pick(time.monotonic(), exclude)
            self.router.acquire(replica)
            try:
                outcome = await self._attempt(run, em, replica, attempt, deadline, max_tokens)
            finally:
                self.router.release(replica)
            attempt = outcome.attempt
            err = outcome.error
            fin = outcome.finish
            if (
                fin is not None
                and fin.finish_reason == FR.FINISH_REASON_CANCELLED
                and outcome.own_reason is None
            ):
                # Nobody here asked to stop: the server cancelled it (drain, "shutdown").
                err = _server_cancelled(fin.message)
            if err is not None and err.code() in RETRYABLE and outcome.own_reason is None:
                await em.flush()
                self.router.failed(replica, time.monotonic())
                exclude = {replica}
                retries += 1
                if retries > s.retries:
                    await self._terminal(
                        run,
                        em,
                        env.failed(
                            MODEL_UNAVAILABLE,
                            f"no model server could serve the request after {retries} tries: "
                            f"{err.code().name}",
                            em.usage(prompt_tokens),
                            em.last_seq,
                        ),
                    )
                    return
                self.stats["retries"] += 1
                self.metrics.retries.add(1)
                delay = backoff_s(retries, s.backoff_base_ms / 1000, s.backoff_cap_ms / 1000)
                log.info(
                    "model server unavailable; retrying",
                    extra=telemetry.fields(
                        replica=replica,
                        retry=retries,
                        delay_s=round(delay, 3),
                        code=err.code().name,
                    ),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.cancelled.wait(), delay)
                if run.cancel_reason is not None:
                    outcome = _Outcome(
                        own_reason=FR.FINISH_REASON_CANCELLED, own_message=run.cancel_reason
                    )
                elif time.monotonic() >= deadline:
                    outcome = _Outcome(
                        own_reason=FR.FINISH_REASON_TIMEOUT, own_message="wall-time limit reached"
                    )
                else:
                    continue
            else:
                self.router.succeeded(replica)
            await self._finish(run, em, env, outcome, prompt_tokens)
            return

    async def _finish(
        self, run: Run, em: Emitter, env: Envelope, outcome: _Outcome, prompt_tokens: int
    ) -> None:
        await em.flush()
        fin = outcome.finish
        if fin is not None and fin.HasField("usage") and fin.usage.prompt_tokens:
            prompt_tokens = fin.usage.prompt_tokens
        usage = em.usage(prompt_tokens)
        timings = fin.timings if fin is not None else None
        if outcome.own_reason is not None:
            event = env.completed(
                outcome.own_reason, usage, timings, em.last_seq, outcome.own_message
            )
        elif fin is not None and fin.finish_reason != FR.FINISH_REASON_ERROR:
            event = env.completed(fin.finish_reason, usage, timings, em.last_seq, fin.message)
        elif fin is not None:
            event = env.failed(INTERNAL, fin.message or "model engine failure", usage, em.last_seq)
        else:
            err = outcome.error
            assert err is not None
            code = failure_code(err.code(), err.details() or "")
            event = env.failed(code, err.details() or err.code().name, usage, em.last_seq)
        await self._terminal(run, em, event)

    async def _terminal(self, run: Run, em: Emitter, event: events_pb2.Event) -> None:
        sent_at = time.monotonic()
        await em.send(event)
        await em.settle()
        self.metrics.produce_latency.record(time.monotonic() - sent_at)
        if run.tokens_span is not None:
            body = event.WhichOneof("body")
            run.tokens_span.add_event(
                "finish",
                {
                    "llmstream.outcome": body or "",
                    "llmstream.last_seq": em.last_seq,
                    "llmstream.events": em.events,
                },
            )
            if body == "failed":
                run.tokens_span.set_status(Status(StatusCode.ERROR, event.failed.code))
        self.stats["failed" if event.HasField("failed") else "completed"] += 1
        self.stats["events"] += em.events
        self.stats["model_deltas"] += em.deltas_in
        if event.HasField("failed"):
            outcome = event.failed.code
        else:
            outcome = finish_reason_name(event.completed.finish_reason)
        m = self.metrics
        m.requests.add(1, {"outcome": outcome})
        m.tokens.add(len(em.token_ids) - em.first_token_count)
        m.token_events.add(em.last_seq - em.first_seq)
        m.model_deltas.add(em.deltas_in)
        self._finished(run)

    async def _attempt(
        self,
        run: Run,
        em: Emitter,
        replica: str,
        attempt: int,
        deadline: float,
        max_tokens: int,
    ) -> _Outcome:
        """One Generate stream. Produces `started` on the first server message, then deltas.

        A stop decided here (cancel, wall time, max tokens, output filter) sends
        GenerateCancel and keeps reading until the server's finish (usage, timings); deltas
        after the stop are dropped. If the finish does not come within `cancel_grace_s`, the
        call is cancelled.
        """
        sub = run.submit.submitted
        start = model_service_pb2.GenerateStart(
            request_id=run.request_id,
            model=sub.model,
            prompt=sub.prompt,
            sampling=sub.sampling,
            max_tokens=max_tokens,
            priority=sub.priority,
            continuation_token_ids=em.token_ids,
        )
        # The model server continues the trace from this client span (gRPC metadata).
        rpc_span = tracing.tracer().start_span(
            tracing.GENERATE_METHOD,
            kind=SpanKind.CLIENT,
            attributes={**tracing.grpc_attributes(replica), "llmstream.attempt": attempt + 1},
        )
        traceparent, tracestate = tracing.trace_context_of(rpc_span)
        metadata: list[tuple[str, str]] = [
            ("x-llmstream-worker", self.settings.worker_id),
            ("traceparent", traceparent),
        ]
        if tracestate:
            metadata.append(("tracestate", tracestate))
        call = self._stub(replica).Generate(metadata=tuple(metadata))
        outcome = _Outcome(attempt=attempt)
        started = False
        stream_filter = self.blocklist.stream() if self.blocklist else None
        stop_now = asyncio.Event()
        stopper = asyncio.create_task(self._stopper(run, call, outcome, deadline, stop_now))
        try:
            await call.write(model_service_pb2.GenerateRequest(start=start))
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    code = await call.code()
                    outcome.error = grpc.aio.AioRpcError(
                        code if code != grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN,
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        details=await call.details() or "stream ended without finish",
                    )
                    break
                if not started:
                    started = True
                    outcome.attempt = attempt = attempt + 1
                    version = await self._model_version(replica, sub.model)
                    await em.send(
                        em.env.started(
                            self.settings.worker_id, replica, version, attempt, em.last_seq
                        ),
                        gates=False,
                    )
                kind = msg.WhichOneof("kind")
                if kind == "finish":
                    outcome.finish = msg.finish
                    break
                if kind != "delta" or outcome.own_reason is not None:
                    continue  # stopping: the client does not get tokens after the stop
                delta = msg.delta
                if stream_filter is not None and stream_filter.check(delta.text) is not None:
                    outcome.own_reason = FR.FINISH_REASON_CONTENT_FILTER
                    outcome.own_message = "output filter: blocked term"
                    stop_now.set()
                    continue
                room = max_tokens - len(em.token_ids) - em.coalescer.pending_tokens
                if max_tokens and len(delta.token_ids) > room:
                    # The server enforces max_tokens too; this only guards against a bad one.
                    outcome.own_reason = FR.FINISH_REASON_LENGTH
                    outcome.own_message = "max_tokens reached"
                    stop_now.set()
                    continue
                if not em.deltas_in and run.tokens_span is not None:
                    run.tokens_span.add_event("first_token", {"llmstream.seq": em.last_seq + 1})
                await em.push(delta.text, list(delta.token_ids))
        except grpc.aio.AioRpcError as exc:
            if outcome.own_reason is None:
                outcome.error = exc
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from read() when the stopper cancelled the call
            # after the grace period; a cancellation of this task itself must propagate.
            task = asyncio.current_task()
            if outcome.own_reason is None or (task is not None and task.cancelling()):
                raise
        finally:
            stopper.cancel()
            call.cancel()
            _end_rpc_span(rpc_span, outcome)
        return outcome

    async def _stopper(
        self,
        run: Run,
        call: Any,
        outcome: _Outcome,
        deadline: float,
        stop_now: asyncio.Event,
    ) -> None:
        """Watches one attempt for a cancel, the wall-time limit or a stop decided by the
        reader; then asks the server to stop and, after a grace period, cancels the call."""
        waits = [
            asyncio.ensure_future(run.cancelled.wait()),
            asyncio.ensure_future(stop_now.wait()),
        ]
        try:
            await asyncio.wait(
                waits,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for w in waits:
                w.cancel()
        if outcome.own_reason is None:
            if run.cancel_reason is not None:
                outcome.own_reason = FR.FINISH_REASON_CANCELLED
                outcome.own_message = run.cancel_reason
            else:
                outcome.own_reason = FR.FINISH_REASON_TIMEOUT
                outcome.own_message = "wall-time limit reached"
        with contextlib.suppress(Exception):
            await call.write(
                model_service_pb2.GenerateRequest(
                    cancel=model_service_pb2.GenerateCancel(reason=outcome.own_message)
                )
            )
        await asyncio.sleep(self.settings.cancel_grace_s)
        call.cancel()


def _server_cancelled(message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details=f"model server cancelled the stream: {message or 'no reason'}",
    )


def _side_reader(s: Settings, purpose: str) -> AIOKafkaConsumer:
    """A consumer outside the group (assigned partitions by hand, never commits)."""
    return AIOKafkaConsumer(
        bootstrap_servers=s.bootstrap,
        group_id=None,
        client_id=f"{s.worker_id}-{purpose}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )


def _end_rpc_span(span: Span, outcome: _Outcome) -> None:
    if outcome.error is not None:
        code = outcome.error.code()
        span.set_status(Status(StatusCode.ERROR, code.name))
    elif outcome.finish is not None or outcome.own_reason is not None:
        code = grpc.StatusCode.OK
    else:
        code = grpc.StatusCode.CANCELLED
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.end()


async def serve(settings: Settings) -> int:
    """Run a worker until SIGTERM/SIGINT (exit status 0) or a fatal Kafka error (1)."""
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # Unix event loops (the supported platform)
        loop.add_signal_handler(sig, worker.request_stop)
    await worker.run()
    return 1 if worker.fatal is not None else 0
