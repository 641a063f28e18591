"""Who owned a request when, for the zombie fault (pure: no I/O; unit-tested).

A zombie worker (paused past its session timeout, then resumed) may keep writing events for
requests another worker has taken over. `owner_truth` reads a request's events in log order,
without `llmstream.fold` (this is what the fold is checked against), and says what a reader that
respects ownership must make of them; `judge_owner` fails a verdict whose bill is not the
owner's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from llmstream.fold import RequestState, finish_reason_name
from llmstream.v1 import events_pb2
from llmstream_tools.chaos.check import Verdict


@dataclass
class OwnerTruth:
    """What a reader that respects ownership must make of one request's log."""

    text: str = ""
    last_seq: int = 0
    usage: tuple[int, int] | None = None  # (prompt, completion) of the owner's terminal event
    finish_reason: str = ""
    late_events: int = 0  # events the zombie wrote while it did not own the request
    parts: dict[int, str] = field(default_factory=dict)  # seq -> text
    owner: str = ""  # producer of the last `started` that counts
    taken_over: bool = False  # another worker started it while the zombie was out
    # Fence generation -> the worker whose `started` carried it: compact token deltas name
    # no producer (docs/events.md), their fence says whose attempt they belong to.
    writers: dict[int, str] = field(default_factory=dict)


def owner_truth(
    events: Iterable[events_pb2.Event], zombie: str, out_ms: tuple[int, int | None]
) -> dict[str, OwnerTruth]:
    """Per request, from its events in log order, without `llmstream.fold` (this is what the
    fold is checked against). `out_ms`: when the zombie was out of the group, by the workers'
    logs (wall-clock ms): from another worker's first assignment after the freeze to the
    zombie's own next assignment (None: it never got one). Events the zombie created in that
    window are stale; a `started` drops the seqs above its `resumed_after_seq` (its attempt
    continues from there, whatever landed meanwhile) and makes its writer the owner; then the
    owner's first delta per seq and its first terminal event count. An event without a
    producer id (a compact token delta) was written by the worker whose `started` carried its
    fence generation."""
    start, end = out_ms
    out: dict[str, OwnerTruth] = {}
    for ev in events:
        kind = ev.WhichOneof("body")
        if kind not in ("started", "token_delta", "completed", "failed"):
            continue
        t = out.setdefault(ev.request_id, OwnerTruth())
        at = int(ev.event_time.ToMilliseconds())
        if kind == "started":
            t.writers[ev.fence.generation] = ev.producer_id
        writer = ev.producer_id or t.writers.get(ev.fence.generation, "")
        if writer == zombie and at >= start and (end is None or at < end):
            t.late_events += 1
            continue
        if kind == "started":
            t.taken_over = t.taken_over or (ev.producer_id != zombie and at >= start)
            t.owner = ev.producer_id
            after = ev.started.resumed_after_seq
            t.parts = {seq: text for seq, text in t.parts.items() if seq <= after}
        elif t.usage is not None or writer != t.owner:
            continue
        elif kind == "token_delta":
            t.parts.setdefault(ev.token_delta.seq, ev.token_delta.text)
        else:
            body = ev.completed if kind == "completed" else ev.failed
            t.usage = (body.usage.prompt_tokens, body.usage.completion_tokens)
            t.finish_reason = (
                finish_reason_name(ev.completed.finish_reason) if kind == "completed" else "error"
            )
    for t in out.values():
        t.last_seq = max(t.parts, default=0)
        t.text = "".join(t.parts[s] for s in sorted(t.parts))
    return out


def judge_owner(v: Verdict, logged: RequestState | None, truth: OwnerTruth) -> None:
    """The bill must be the owner's: the fold's terminal usage equals the owner's."""
    if logged is None or not logged.terminal or truth.usage is None:
        return
    if (logged.prompt_tokens, logged.completion_tokens) != truth.usage:
        v.billing_mismatch = True
        v.reasons.append(
            f"billed {logged.prompt_tokens}+{logged.completion_tokens}, the owner's terminal "
            f"says {truth.usage[0]}+{truth.usage[1]} (a stale attempt's bill)"
        )
