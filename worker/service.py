"""The worker's async shell: Kafka prompts -> gRPC Generate -> keyed token events.

One consumer (group, manual commits) reads the prompts topic; each `submitted` becomes an
asyncio task (`worker.executor`) that streams from a model server and produces `started`,
coalesced `token_delta`s (seq 1..n) and exactly one terminal event to the request's reply
partition. This module owns the Kafka side: fetching, rebalances, commits, dead letters,
shutdown. See docs/worker.md for the guarantees and how each is achieved.

Background loops (cancel lookahead, committer, lease watchdog, the model servers' worker watch
of worker/liveness.py) run under a `Supervisor`: if one
dies, the worker stops at once and exits 1, so the orchestrator restarts it instead of it running
on without cancels or commits. The fetch loop is `run`'s own body: its failure ends `run`.

Fencing (docs/events.md): every event carries the group generation of its partition's
assignment and its attempt, and nothing is produced while the `ProduceGate` (worker/lease.py)
is closed: after the process stood still for half its session timeout, until a commit with its
generation succeeds; after the group refused a commit, until a new assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from llmstream import catalog, codec, kafka, telemetry
from llmstream.runner import Shutdown
from llmstream.supervisor import Supervisor
from llmstream.v1 import events_pb2, model_service_pb2
from worker.cancels import CancelLookahead, EarlyCancels
from worker.executor import Executor
from worker.gatekeeper import Gatekeeper
from worker.lease import TICK_S, ProduceGate
from worker.liveness import GroupEvictor, PeerWatch
from worker.metrics import WorkerMetrics
from worker.models import ModelServers
from worker.partitions import Partitions, PartitionState
from worker.read_ahead import ReadAhead
from worker.run import Run
from worker.settings import Settings
from worker.takeover import TakeoverReader
from worker.tier_lookup import PgTiers, TierGuard
from worker.tiers import TIER_UNAVAILABLE, Refusal, TierCache

log = logging.getLogger("worker")

COMMIT_INTERVAL_S = 0.1
FETCH_TIMEOUT_MS = 100  # how often the fetch loop looks at the in-flight bound and shutdown
REPLY_METADATA_TIMEOUT_S = 10.0
# Heartbeats of the group member. A rebalance reaches a member with its next heartbeat, and
# every member must rejoin before it completes: this bounds how long a rebalance started by
# another worker (a lost worker evicted, docs/worker.md "Fast takeover") waits for this one.
HEARTBEAT_INTERVAL_MS = 300
# The offsets read when partitions are assigned, right after a rebalance (a broker that has just
# restarted may be slow): past this the worker stops rather than run untracked partitions.
ASSIGNMENT_READ_LIMIT_S = 60.0


@dataclass
class KafkaClients:
    consumer: AIOKafkaConsumer  # the group member on the prompts topic
    producer: AIOKafkaProducer  # events and dead letters
    takeover: AIOKafkaConsumer  # reads reply partitions of the tokens topic (takeover)
    # Reads the assigned prompt partitions ahead of the group consumer, for cancels only.
    lookahead: AIOKafkaConsumer

    @classmethod
    def connect(cls, s: Settings) -> KafkaClients:
        conn = kafka.Connection(s.bootstrap)
        return cls(
            consumer=kafka.group_consumer(
                conn,
                s.worker_id,
                s.group,
                session_timeout_ms=s.session_timeout_ms,
                heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            ),
            producer=kafka.event_producer(conn, s.worker_id),
            takeover=kafka.reader(conn, f"{s.worker_id}-takeover"),
            lookahead=kafka.reader(conn, f"{s.worker_id}-cancels"),
        )

    def generation(self) -> int:
        """The group generation of the current assignment. aiokafka has no public accessor
        (its coordinator sets it before calling `on_partitions_assigned`); the fence needs it
        because it is the one number that grows with every change of owner."""
        return int(self.consumer._coordinator.generation)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance callbacks. aiokafka only logs a callback's exception; here it stops the
    worker, which must not run on with partitions it does not track."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._guarded(self.worker.on_revoked(set(revoked)), "revocation")

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._guarded(self.worker.on_assigned(set(assigned)), "assignment")

    async def _guarded(self, step: Awaitable[None], what: str) -> None:
        try:
            await step
        except Exception as exc:
            log.exception("partition %s failed; stopping the worker", what)
            self.worker.fail(exc)


class Worker:
    def __init__(
        self,
        settings: Settings,
        shutdown: Shutdown | None = None,
        *,
        clients: KafkaClients | None = None,
        meter: Any | None = None,
        tiers: TierGuard | None = None,
    ) -> None:
        s = self.settings = settings
        self.shutdown = shutdown or Shutdown()
        self.clients = clients or KafkaClients.connect(settings)
        self.partitions = Partitions()
        # Fetched submits waiting for a slot, started by fair share (docs/scheduling.md).
        self.read_ahead = ReadAhead(s.read_ahead, s.read_ahead_bytes, s.aging_s)
        self.metrics = WorkerMetrics(lambda: self.read_ahead.running, meter)
        self.supervisor = Supervisor("worker")
        self.early_cancels = EarlyCancels()
        self.lookahead = CancelLookahead(
            self.clients.lookahead, self.partitions, self._cancel_ahead, self.metrics
        )
        self.takeover = TakeoverReader(self.clients.takeover, s.tokens_topic, s.takeover_margin_ms)
        self.models = ModelServers(s.model_server_tls_ca)
        # The group drops a member after its session timeout without heartbeat; half of it
        # standing still is already a doubt worth a round trip to the coordinator.
        self.gate = ProduceGate(s.session_timeout_ms / 2000)
        self.executor = Executor(
            s,
            self.clients.producer,
            self.models,
            self.partitions,
            self.lookahead,
            self.metrics,
            on_fatal=self.fail,
            gate=self.gate,
        )
        # Fast takeover (worker/liveness.py): the model servers report a watcher whose stream
        # broke; this worker evicts that member from the group instead of waiting for its
        # session timeout.
        self.evictor = GroupEvictor(self.clients.consumer, s.group)
        self.peer_watch = PeerWatch(
            self.models,
            s.model_servers,
            s.worker_id,
            s.group,
            on_lost=self._worker_lost,
            on_broken=self._watch_broken,
        )
        self._evictions: set[asyncio.Task[None]] = set()
        self.dead_letters = kafka.DeadLetterWriter(self.clients.producer, s.dlq_topic, s.worker_id)
        # The tier check (worker/tiers.py): `tiers` given, or PostgreSQL's when it is on.
        self.pg_tiers: PgTiers | None = None
        if tiers is None and s.tier_check:
            self.pg_tiers = PgTiers(s.database_url)
            tiers = TierGuard(self.pg_tiers, TierCache(s.tier_cache_s, s.tier_stale_s))
        self.gatekeeper = Gatekeeper(
            s,
            self.clients.producer,
            self.gate,
            self.partitions,
            self.metrics,
            tiers,
            on_fatal=self.fail,
        )
        # Set by a failure after which nothing should be produced or fetched (a produce that
        # failed for good, a rebalance callback that failed): drain, then exit 1.
        self.fatal: BaseException | None = None
        # A fetched batch is handled whole (takeover lookup included) before a rebalance moves
        # its partitions, and the other way round.
        self._lock = asyncio.Lock()
        self._reply_partitions: dict[str, int] = {}

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        """Until a shutdown request (drain; exit status 0), a fatal error (drain; 1) or the
        death of a background loop (stop at once; 1)."""
        c, s = self.clients, self.settings
        if self.pg_tiers is not None:
            await self.pg_tiers.open()  # connects on the first lookup, not now
        await c.producer.start()
        await c.takeover.start()
        await c.lookahead.start()
        try:
            c.consumer.subscribe([s.prompts_topic], listener=_Listener(self))
            await c.consumer.start()
            log.info(
                "worker started",
                extra=telemetry.fields(
                    worker_id=s.worker_id, group=s.group, model_servers=s.model_servers
                ),
            )
            try:
                self.supervisor.spawn(self.lookahead.run(), "cancel-lookahead")
                self.supervisor.spawn(self._commit_loop(), "committer")
                self.supervisor.spawn(self._lease_watchdog(), "lease-watchdog")
                self.supervisor.spawn(self.peer_watch.run(), "peer-watch")
                # The gateways' model catalog (docs/events.md): what our replicas serve.
                stubs = {r: self.models.stub(r) for r in s.model_servers}
                self.supervisor.spawn(
                    catalog.announce_served_models(c.producer, stubs, s.worker_id),
                    "catalog-announcer",
                )
                await self._fetch_loop()
                await self._wind_down()
            finally:
                await self._abandon(self.partitions.runs())
                await self.peer_watch.leave()  # a departure, not a death (worker/liveness.py)
                await self.supervisor.stop()
                await self._last_commit()
                await c.consumer.stop()  # leaves the group: the partitions move at once
        finally:
            await c.lookahead.stop()
            await c.takeover.stop()
            await c.producer.stop()
            await self.models.close()
            if self.pg_tiers is not None:
                await self.pg_tiers.close()
        code = 0 if self.fatal is None and self.supervisor.healthy else 1
        log.info("worker stopped", extra=telemetry.fields(exit_status=code))
        return code

    def request_stop(self) -> None:
        """What SIGTERM does (the runner's `Shutdown`): stop fetching and drain."""
        self.shutdown.requested.set()

    def fail(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc

    def _stop_wanted(self) -> bool:
        return (
            self.shutdown.requested.is_set()
            or self.shutdown.forced.is_set()
            or self.fatal is not None
            or not self.supervisor.healthy
        )

    async def _wind_down(self) -> None:
        if not self.supervisor.healthy:
            # Without its cancels or commits the worker must not serve on; what runs now is
            # continued by the next owner (takeover) once this worker has left the group.
            log.error(
                "a background loop died; stopping without a drain",
                extra=telemetry.fields(failures=self.supervisor.failures),
            )
            return
        runs = self.partitions.runs()
        log.info("draining", extra=telemetry.fields(in_flight=len(runs)))
        left = await self._wait_for(runs, self.settings.drain_timeout_s)
        if left:
            log.info(
                "drain ended: leaving requests uncommitted", extra=telemetry.fields(n=len(left))
            )

    async def _wait_for(self, runs: list[Run], timeout_s: float) -> list[Run]:
        """Wait until the runs end, the timeout, a second signal or a dead loop; returns the
        runs still going."""
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            waiters = [
                asyncio.ensure_future(asyncio.wait(tasks)),
                asyncio.ensure_future(self.shutdown.forced.wait()),
                asyncio.ensure_future(self.supervisor.failed.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        return [r for r in runs if r.task is None or not r.task.done()]

    async def _abandon(self, runs: list[Run]) -> None:
        """Stop runs without a terminal event; their prompts stay uncommitted for takeover."""
        tasks = []
        for run in runs:
            run.abandoned = True
            if run.task is not None and not run.task.done():
                run.task.cancel()
                tasks.append(run.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            self.partitions.drop(run)

    # ---------------------------------------------------------------- rebalance

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop the revoked partitions' runs before the rebalance completes and commit, so the
        new owner's read of the tokens topic sees all this worker will ever write."""
        async with self._lock:
            runs = self.partitions.runs(revoked)
            if runs:
                log.info("partitions revoked: stopping runs", extra=telemetry.fields(n=len(runs)))
            await self._abandon(runs)
            self.read_ahead.forget(lambda run: run.tp in revoked)
            with contextlib.suppress(KafkaError):
                await self.clients.producer.flush()
            await self._commit()
            for tp in revoked:
                self.partitions.revoke(tp)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        if not assigned:
            return
        consumer = self.clients.consumer
        async with self._lock:
            async with asyncio.timeout(ASSIGNMENT_READ_LIMIT_S):
                ends = await consumer.end_offsets(list(assigned))
                committed = {tp: await consumer.committed(tp) for tp in assigned}
            generation = self.clients.generation()
            for tp in assigned:
                self.partitions.assign(tp, int(ends.get(tp, 0)), committed[tp], generation)
            self.gate.confirm()  # a fresh assignment: the group counts this worker in
            self.peer_watch.set_membership(self.evictor.own_member_id(), generation)
            log.info(
                "partitions assigned",
                extra=telemetry.fields(
                    partitions=sorted(tp.partition for tp in assigned), generation=generation
                ),
            )

    # ---------------------------------------------------------------- fast takeover

    def _worker_lost(self, lost: model_service_pb2.WorkerPresence) -> None:
        """A model server saw another worker's watch break: evict it from the group."""
        task = asyncio.create_task(self.evictor.evict(lost), name="evict")
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    def _watch_broken(self, replica: str) -> None:
        """To that replica this worker may look dead, and the others may have evicted it:
        nothing more is produced until a commit with its generation succeeds."""
        if self._stop_wanted():
            return
        self.gate.lose()
        log.warning(
            "watch of a model server broke: producing paused until the group confirms this worker",
            extra=telemetry.fields(replica=replica),
        )

    # ---------------------------------------------------------------- consuming

    async def _fetch_loop(self) -> None:
        consumer = self.clients.consumer
        while not self._stop_wanted():
            # Runs held in all: the slots plus the read-ahead window.
            bound = self.read_ahead.fetch_bound(self.settings.max_inflight)
            to_pause, to_resume = self.partitions.pause_changes(bound, consumer.assignment())
            if to_pause:
                consumer.pause(*to_pause)
            if to_resume:
                consumer.resume(*to_resume)
            room = self.partitions.room(bound)
            batch = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=room)
            if not batch or self._stop_wanted():
                continue
            truncated = sum(len(records) for records in batch.values()) >= room
            async with self._lock:
                await self._handle_batch(batch, time.monotonic() if truncated else None)

    async def _handle_batch(
        self, batch: dict[TopicPartition, list[Any]], truncated_at: float | None
    ) -> None:
        new_runs: list[tuple[Run, int]] = []
        for tp, records in batch.items():
            state = self.partitions.get(tp)
            if state is None:  # revoked while fetched
                continue
            for rec in records:
                state.fetched(rec.offset)
                run = await self._handle_record(state, rec)
                if run is not None:
                    run.fetched_at = truncated_at
                    new_runs.append((run, len(rec.value or b"")))
        lookups = [r for r, _size in new_runs if r.needs_lookup]
        if lookups:
            await self.takeover.lookup(lookups)
        now = time.monotonic()
        for run, size in new_runs:
            self.read_ahead.add(run, size, now)
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Start runs from the read-ahead window while slots are free; each run's end starts
        the next. Nothing starts once the worker is stopping (the rest stay uncommitted)."""
        if self._stop_wanted():
            return
        now = time.monotonic()
        for run in self.read_ahead.take(self.settings.max_inflight, now, self.partitions.current):
            run.task = asyncio.create_task(self._start(run), name=run.request_id)
            run.task.add_done_callback(functools.partial(self._run_ended, run))

    async def _start(self, run: Run) -> None:
        """The run's task: the tier check, then the executor (or the refusal's terminal)."""
        try:
            refusal = await self.gatekeeper.refusal(run)
        except Exception as exc:  # a bug: fail closed, and end the request instead of hanging
            log.exception("tier check crashed", extra=telemetry.fields(request_id=run.request_id))
            refusal = Refusal(TIER_UNAVAILABLE, f"tier check failed: {type(exc).__name__}")
        if refusal is None:
            await self.executor.execute(run)
        else:
            await self.gatekeeper.refuse(run, refusal)

    def _run_ended(self, run: Run, _task: asyncio.Task[None]) -> None:
        em = run.emitter
        self.read_ahead.ended(run, len(em.token_ids) - em.first_token_count if em else 0)
        self._start_waiting()

    async def _handle_record(self, state: PartitionState, rec: Any) -> Run | None:
        try:
            event = codec.decode(rec.value)
        except codec.DecodeError as exc:
            await self._dead_letter(state, rec, str(exc))
            return None
        kind = event.WhichOneof("body")
        if kind == "submitted":
            return await self._submitted(state, rec, event)
        if kind == "cancel_requested":
            run = self.partitions.run_of(event.request_id)
            if run is not None:
                run.cancel(event.cancel_requested.reason)
            self.early_cancels.pop(event.request_id)
        # Cancels and anything else on the prompts topic need no further work.
        state.done(rec.offset)
        return None

    async def _submitted(
        self, state: PartitionState, rec: Any, event: events_pb2.Event
    ) -> Run | None:
        problem = await self._invalid_submit(event)
        if problem is not None:
            await self._dead_letter(state, rec, problem)
            return None
        if self.partitions.known(event.request_id):
            # A repeated submit of a running or just finished request: nothing to do.
            state.done(rec.offset)
            return None
        run = Run(
            tp=state.tp,
            offset=rec.offset,
            record_ts=rec.timestamp,
            submit=event,
            needs_lookup=state.needs_lookup(rec.offset),
        )
        self.partitions.admit(run)
        early = self.early_cancels.pop(event.request_id)
        if early is not None:
            run.cancel(early)
        return run

    def _cancel_ahead(self, request_id: str, reason: str) -> None:
        """A cancel the lookahead read: applied now, or remembered for a submit to come."""
        run = self.partitions.run_of(request_id)
        if run is not None:
            run.cancel(reason)
        elif not self.partitions.ended_recently(request_id):
            self.early_cancels.remember(request_id, reason)

    async def _invalid_submit(self, event: events_pb2.Event) -> str | None:
        """Why a submit cannot be served at all (it goes to the dead-letter topic), or None."""
        reply = event.submitted.reply
        tokens_topic = self.settings.tokens_topic
        topic = reply.topic or tokens_topic
        if topic != tokens_topic:
            # Gateways reply on the deployment's tokens topic. Any other name would cost a
            # metadata wait (10 s, all prompts stalled) per record: refused at once.
            return f"reply topic {topic!r} is not the tokens topic {tokens_topic!r}"
        count = await self._partition_count(topic)
        if count is None:
            return f"reply topic {topic!r} is unknown"
        if not 0 <= reply.partition < count:
            return f"reply partition {reply.partition} does not exist in topic {topic!r}"
        return None

    async def _partition_count(self, topic: str) -> int | None:
        """Partitions of a topic (cached once known); None when the metadata is unavailable."""
        if topic not in self._reply_partitions:
            try:
                parts = await asyncio.wait_for(
                    self.clients.producer.partitions_for(topic), REPLY_METADATA_TIMEOUT_S
                )
            except (KafkaError, TimeoutError):
                return None
            self._reply_partitions[topic] = len(parts or ())
        return self._reply_partitions[topic]

    async def _dead_letter(self, state: PartitionState, rec: Any, reason: str) -> None:
        """To the DLQ; a submit that still names its request also gets its terminal `failed`
        (worker/dead_letters.py), so that its client is told and its quota settles. Both are
        acknowledged before the offset counts as done."""
        await self.dead_letters.send(rec, reason)
        self.metrics.dead_letters.add(1)
        tokens = await self._partition_count(self.settings.tokens_topic)
        ended = await self.gatekeeper.end_dead_lettered(rec, reason, state.generation, tokens)
        log.warning(
            "poison record sent to the dead-letter topic",
            extra=telemetry.fields(
                reason=reason,
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                request_failed=ended,
            ),
        )
        state.done(rec.offset)

    # ---------------------------------------------------------------- committing

    async def _last_commit(self) -> None:
        """Flush and commit on the way out. Best effort: whatever stays uncommitted is run
        again by the next owner, and the group must be left whatever happened here."""
        try:
            with contextlib.suppress(KafkaError):
                await self.clients.producer.flush()
            await self._commit()
        except Exception:
            log.exception("last commit failed")

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self._commit()

    async def _lease_watchdog(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.gate.tick():
                log.warning(
                    "the worker stood still for half its session timeout: producing paused "
                    "until the group confirms it"
                )

    async def _commit(self) -> None:
        """Commit the done prefix. While the gate is closed, the commit (of the same offsets
        if nothing is new) also asks the group whether this worker is still a member."""
        consumer = self.clients.consumer
        confirming = not self.gate.lease.held
        assigned = consumer.assignment()
        todo = (self.partitions.commit_point if confirming else self.partitions.to_commit)(assigned)
        if not todo:
            return
        try:
            await asyncio.wait_for(consumer.commit(todo), kafka.CALL_TIMEOUT_S)
        except CommitFailedError as exc:
            # The group moved on without this worker: another may own these partitions now.
            # Nothing more is produced until the rebalance gives it partitions again.
            self.gate.lose()
            log.warning(
                "commit refused by the group: producing stopped until the next assignment",
                extra=telemetry.fields(error=repr(exc)),
            )
            return
        except (KafkaError, TimeoutError) as exc:
            # The next round commits the same prefix (or a longer one).
            log.warning("commit failed", extra=telemetry.fields(error=repr(exc)))
            return
        self.partitions.committed(todo)
        if confirming:
            self.gate.confirm()
            log.info("the group still counts this worker in: producing again")
