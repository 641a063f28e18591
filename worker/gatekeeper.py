"""Submits the worker ends without running them, and how (the shell around `tiers` and
`dead_letters`): a submit beyond its tenant's tier ends `failed` before any model call; a
dead-lettered submit that still names its request ends `failed` `dead_lettered` on its reply
partition, so its client gets `done` and its reservation is settled (docs/worker.md)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from llmstream import codec, telemetry
from worker import policy
from worker.core import envelope_of
from worker.dead_letters import dead_letter_terminal
from worker.emitter import Emitter
from worker.lease import ProduceGate
from worker.metrics import WorkerMetrics
from worker.partitions import Partitions
from worker.run import Run
from worker.settings import Settings
from worker.tier_lookup import TierGuard, TierUnavailable
from worker.tiers import TIER_UNAVAILABLE, Refusal, check_submit

log = logging.getLogger("worker")


class Gatekeeper:
    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        gate: ProduceGate,
        partitions: Partitions,
        metrics: WorkerMetrics,
        tiers: TierGuard | None,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.gate = gate
        self.partitions = partitions
        self.metrics = metrics
        self.tiers = tiers
        self.on_fatal = on_fatal

    async def refusal(self, run: Run) -> Refusal | None:
        """Why the run must not start (None: start it). Not asked for a request already
        ended in the log or cancelled before its start: the executor ends those as usual."""
        prior = run.prior
        if self.tiers is None or run.cancel_reason is not None or (prior and prior.terminal):
            return None
        s = self.settings
        limits = policy.limits(
            run.submit,
            default_timeout_ms=s.default_timeout_ms,
            max_tokens_cap=s.max_tokens,
            now_ms=time.time_ns() // 1_000_000,
        )
        deadline = time.monotonic() + limits.remaining_s
        try:
            tier = await self.tiers.tier(run.submit.tenant_id, deadline, run.cancelled)
        except TierUnavailable as exc:
            if run.cancel_reason is not None:
                return None  # cancelled while waiting: ends `cancelled`
            return Refusal(TIER_UNAVAILABLE, f"the tenant's tier could not be read: {exc}")
        return check_submit(run.submit, tier)

    async def refuse(self, run: Run, refusal: Refusal) -> None:
        """End the run with its one `failed` event (after the tokens an earlier owner
        produced, if any), without a model call."""
        s = self.settings
        prior = run.prior
        reply = run.submit.submitted.reply
        # Fenced as the newest attempt the log knows, so that the fold keeps this terminal.
        env = dataclasses.replace(
            envelope_of(run.submit, s.worker_id, run.generation),
            attempt=prior.attempts if prior else 0,
        )
        emitter = Emitter(
            self.producer,
            reply.topic or s.tokens_topic,
            reply.partition,
            env,
            gate=self.gate,
            coalesce_s=0.0,
            coalesce_bytes=s.coalesce_bytes,
            last_seq=prior.last_seq if prior else 0,
            token_ids=prior.token_ids if prior else (),
        )
        event = emitter.env.failed(
            refusal.code, refusal.message, emitter.usage(0), emitter.last_seq
        )
        try:
            await emitter.send(event)
            await emitter.settle()
        except KafkaError as exc:
            log.error(
                "producing failed; stopping the worker", extra=telemetry.fields(error=repr(exc))
            )
            self.on_fatal(exc)
            return
        finally:
            emitter.close()
        log.info(
            "submit refused: %s",
            refusal.code,
            extra=telemetry.fields(
                request_id=run.request_id,
                tenant_id=run.submit.tenant_id,
                code=refusal.code,
                reason=refusal.message,
            ),
        )
        self.metrics.requests.add(1, {"outcome": refusal.code})
        self.partitions.finish(run)

    async def end_dead_lettered(
        self, rec: Any, reason: str, generation: int, tokens_partitions: int | None
    ) -> bool:
        """After a record went to the DLQ: its request's `failed` event, when it names one.
        Returns whether one was produced."""
        if not tokens_partitions:
            return False
        terminal = dead_letter_terminal(
            rec.key,
            rec.value,
            reason,
            tokens_partitions=tokens_partitions,
            producer_id=self.settings.worker_id,
            generation=generation,
        )
        if terminal is None:
            return False
        if not self.gate.is_open():
            await self.gate.wait()
        event = terminal.event
        await self.producer.send_and_wait(
            self.settings.tokens_topic,
            codec.encode(event),
            key=codec.key(event),
            partition=terminal.partition,
            headers=codec.headers(event),
        )
        log.info(
            "dead-lettered submit ended failed",
            extra=telemetry.fields(request_id=event.request_id, partition=terminal.partition),
        )
        self.metrics.requests.add(1, {"outcome": "dead_lettered"})
        return True
