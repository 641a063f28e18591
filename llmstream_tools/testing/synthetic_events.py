"""Synthetic request event streams (tests and benchmarks; the gateway and workers produce the
real ones). Each request gets a realistic lifecycle: submitted (prompts topic), started,
token deltas, sometimes a takeover (second `started`) or a redelivered delta, and exactly one
terminal event (completed with stop/length/cancelled, or failed).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from llmstream import codec
from llmstream.v1 import common_pb2, events_pb2


@dataclass(frozen=True)
class Produced:
    topic: str
    event: events_pb2.Event


@dataclass(frozen=True)
class RequestPlan:
    request_id: str
    tenant_id: str
    model: str
    n_tokens: int
    prompt_tokens: int
    reserved_tokens: int
    outcome: str  # stop | length | cancelled | failed


def plan(
    n: int, tenants: list[str], models: list[str], seed: int = 0, max_tokens: int = 16
) -> list[RequestPlan]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_tokens = rng.randint(0, max_tokens)
        prompt = rng.randint(1, 50)
        outcome = rng.choices(["stop", "length", "cancelled", "failed"], [70, 15, 10, 5])[0]
        out.append(
            RequestPlan(
                request_id=f"req-{seed}-{i:07d}",
                tenant_id=tenants[i % len(tenants)],
                model=models[i % len(models)],
                n_tokens=n_tokens,
                prompt_tokens=prompt,
                reserved_tokens=prompt + max_tokens,
                outcome=outcome,
            )
        )
    return out


def events_of(
    p: RequestPlan, prompts_topic: str, tokens_topic: str, rng: random.Random | None = None
) -> list[Produced]:
    """The events of one request in production order (per topic)."""
    rng = rng or random.Random(p.request_id)

    def new() -> events_pb2.Event:
        return codec.new_event(p.request_id, p.tenant_id, "synthetic")

    out: list[Produced] = []
    sub = new()
    s = sub.submitted
    s.model = p.model
    s.prompt.text = "hello"
    s.max_tokens = p.reserved_tokens - p.prompt_tokens
    s.estimated_prompt_tokens = p.prompt_tokens
    s.reserved_tokens = p.reserved_tokens
    s.reply.topic = tokens_topic
    out.append(Produced(prompts_topic, sub))
    if p.outcome == "failed" and p.n_tokens == 0:
        fail = new()
        fail.failed.code = "model_unavailable"
        fail.failed.message = "no replica"
        fail.failed.usage.prompt_tokens = p.prompt_tokens
        out.append(Produced(tokens_topic, fail))
        return out
    st = new()
    st.started.attempt = 1
    st.started.worker_id = "w-0"
    out.append(Produced(tokens_topic, st))
    takeover_at = rng.randint(1, p.n_tokens) if p.n_tokens > 2 and rng.random() < 0.1 else 0
    for seq in range(1, p.n_tokens + 1):
        if seq == takeover_at:
            again = new()
            again.started.attempt = 2
            again.started.worker_id = "w-1"
            again.started.resumed_after_seq = seq - 1
            out.append(Produced(tokens_topic, again))
        d = new()
        d.token_delta.seq = seq
        d.token_delta.text = f" t{seq}"
        d.token_delta.token_ids.append(seq)
        out.append(Produced(tokens_topic, d))
        if rng.random() < 0.02:  # at-least-once redelivery of a delta
            out.append(Produced(tokens_topic, d))
    if p.outcome == "cancelled":
        cancel = new()
        cancel.cancel_requested.reason = "client"
        out.append(Produced(prompts_topic, cancel))
    end = new()
    if p.outcome == "failed":
        end.failed.code = "internal"
        end.failed.message = "engine crashed"
        end.failed.usage.prompt_tokens = p.prompt_tokens
        end.failed.usage.completion_tokens = p.n_tokens
        end.failed.last_seq = p.n_tokens
    else:
        c = end.completed
        c.finish_reason = {
            "stop": common_pb2.FINISH_REASON_STOP,
            "length": common_pb2.FINISH_REASON_LENGTH,
            "cancelled": common_pb2.FINISH_REASON_CANCELLED,
        }[p.outcome]
        c.usage.prompt_tokens = p.prompt_tokens
        c.usage.completion_tokens = p.n_tokens
        c.last_seq = p.n_tokens
        c.timings.time_to_first_token_us = 1000
    out.append(Produced(tokens_topic, end))
    return out


def interleaved(
    plans: list[RequestPlan], prompts_topic: str, tokens_topic: str, seed: int = 0, width: int = 50
) -> Iterator[Produced]:
    """Events of many requests interleaved (`width` requests in flight), each request's own
    order kept."""
    rng = random.Random(seed)
    pending = iter(plans)
    active: list[list[Produced]] = []
    while True:
        while len(active) < width:
            p = next(pending, None)
            if p is None:
                break
            active.append(events_of(p, prompts_topic, tokens_topic, random.Random(p.request_id)))
        if not active:
            return
        i = rng.randrange(len(active))
        yield active[i].pop(0)
        if not active[i]:
            active.pop(i)


def used_tokens(p: RequestPlan) -> tuple[int, int]:
    """(prompt, completion) the request is billed: nothing for one that failed before it
    started (the billing policy, docs/gateway.md)."""
    if p.outcome == "failed" and p.n_tokens == 0:
        return 0, 0
    return p.prompt_tokens, p.n_tokens


def main(argv: list[str] | None = None) -> int:
    """`python -m llmstream_tools.testing.synthetic_events --requests 200`: produce synthetic request streams to
    the configured topics (a demo feed for the aggregator and replay; not a gateway)."""
    import argparse
    import asyncio

    from llmstream import config, topics

    p = argparse.ArgumentParser(
        prog="python -m llmstream_tools.testing.synthetic_events", description=main.__doc__
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--tenants", nargs="+", default=["demo"])
    p.add_argument("--model", default="synthetic")
    p.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = p.parse_args(argv)

    async def run() -> int:
        from llmstream_tools.testing.aggregator import new_producer, produce

        plans = plan(args.requests, args.tenants, [args.model], seed=args.seed)
        producer = await new_producer(config.kafka_bootstrap())
        try:
            return await produce(
                producer, interleaved(plans, topics.prompts(), topics.tokens(), seed=args.seed)
            )
        finally:
            await producer.stop()

    sent = asyncio.run(run())
    print(f"produced {sent} events of {args.requests} requests (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
