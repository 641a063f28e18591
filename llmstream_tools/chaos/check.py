"""Verdicts of one fault phase, from what was observed (pure: no I/O; unit-tested).

Inputs: per request, what its client received (token frames with arrival times, `done`
frames), the reference text (the synthetic engine's uninterrupted output for the prompt), the
request's folded state from the event log, its ledger rows; per tenant, the Redis counters.

A request is
- **lost** if its client has no `done`, has a seq gap, or assembled a text other than the
  expected one, or the log has no terminal event for it;
- **duplicated** if its client received a seq twice or more than one `done`, or the log has
  more than one terminal event for it;
- a **billing mismatch** if its ledger rows are not exactly one with the log's usage.
The tenant's quota counters must equal its ledger: a difference counts as one more mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmstream.fold import RequestState

# Finish reasons for which the expected text is the whole reference text; any other (a
# cancel, a failure) must have produced a prefix of it.
COMPLETE = ("length", "stop")


@dataclass
class ClientStream:
    """One request as its client saw it, over every socket it used."""

    request_id: str
    prompt: str
    submitted_at: float  # monotonic
    tokens: list[tuple[float, int, str]] = field(default_factory=list)  # (arrival, seq, text)
    dones: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> dict[str, Any] | None:
        return self.dones[0][1] if self.dones else None

    @property
    def text(self) -> str:
        return "".join(t for _, _, t in self.tokens)

    def contiguous_seq(self) -> int:
        """Highest seq n such that 1..n were all received (what a resume continues after)."""
        seen = {s for _, s, _ in self.tokens}
        n = 0
        while n + 1 in seen:
            n += 1
        return n

    def finished_by(self, at: float) -> bool:
        return any(t <= at for t, _ in self.dones)

    def arrivals(self) -> list[float]:
        return sorted([t for t, _, _ in self.tokens] + [t for t, _ in self.dones])


@dataclass
class LedgerRow:
    rows: int
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Verdict:
    request_id: str
    lost: bool = False
    duplicated: bool = False
    billing_mismatch: bool = False
    reasons: list[str] = field(default_factory=list)


def judge_request(
    stream: ClientStream,
    expected: str,
    logged: RequestState | None,
    ledger: LedgerRow | None,
) -> Verdict:
    v = Verdict(stream.request_id)

    def lost(why: str) -> None:
        v.lost = True
        v.reasons.append(why)

    seqs = [s for _, s, _ in stream.tokens]
    if len(seqs) != len(set(seqs)):
        v.duplicated = True
        v.reasons.append(f"client got {len(seqs) - len(set(seqs))} repeated seq(s)")
    if len(stream.dones) > 1:
        v.duplicated = True
        v.reasons.append(f"client got {len(stream.dones)} done frames")
    done = stream.done
    if done is None:
        lost("client got no done")
    if set(seqs) != set(range(1, len(set(seqs)) + 1)):
        lost("client seqs have a gap")
    if done is not None and int(done.get("last_seq", -1)) != len(set(seqs)):
        lost(f"done.last_seq {done.get('last_seq')} but client has {len(set(seqs))} tokens")
    # The text in seq order with repeats dropped: a duplicate is reported as such, not as a
    # wrong text too.
    by_seq = {s: t for _, s, t in reversed(stream.tokens)}
    text = "".join(by_seq[s] for s in sorted(by_seq))
    reason = str(done.get("finish_reason")) if done is not None else None
    if reason in COMPLETE:
        if text != expected:
            lost(f"text differs from expected (got {len(text)} chars, want {len(expected)})")
    elif done is not None and not expected.startswith(text):
        lost(f"{reason}: text is not a prefix of the expected text")
    if logged is None or not logged.terminal:
        lost("no terminal event in the log")
    else:
        if logged.extra_terminals:
            v.duplicated = True
            v.reasons.append(f"log has {1 + logged.extra_terminals} terminal events")
        if logged.missing_seqs:
            lost(f"log misses {logged.missing_seqs} seq(s)")
        if done is not None and logged.text != text:
            lost("client text differs from the log's")
    if logged is not None and logged.terminal:
        if ledger is None or ledger.rows != 1:
            v.billing_mismatch = True
            v.reasons.append(f"{ledger.rows if ledger else 0} ledger rows for 1 terminal event")
        elif (ledger.prompt_tokens, ledger.completion_tokens) != (
            logged.prompt_tokens,
            logged.completion_tokens,
        ):
            v.billing_mismatch = True
            v.reasons.append(
                f"ledger usage {ledger.prompt_tokens}+{ledger.completion_tokens} != log "
                f"{logged.prompt_tokens}+{logged.completion_tokens}"
            )
    elif ledger is not None and ledger.rows:
        v.billing_mismatch = True
        v.reasons.append(f"{ledger.rows} ledger rows without a terminal event")
    return v


def quota_mismatches(day_counter: int, ledger_total_tokens: int, open_streams: int) -> list[str]:
    """The tenant's Redis counters vs its ledger once every request ended and was settled."""
    out = []
    if day_counter != ledger_total_tokens:
        out.append(f"quota day counter {day_counter} != ledger total {ledger_total_tokens}")
    if open_streams:
        out.append(f"{open_streams} stream slot(s) still held")
    return out


def stream_recoveries(
    streams: Iterable[ClientStream], fault_at: float, fault_end: float, min_gap_s: float
) -> list[float | None]:
    """Per stream in flight at `fault_at`: seconds from the fault until it flowed again.

    A stream is stalled while it receives nothing for at least `min_gap_s`; its recovery is
    the end of the last such stall that overlaps [fault_at, fault_end + min_gap_s] (0 when it
    kept flowing; None when it never received anything again).
    """
    out: list[float | None] = []
    for s in streams:
        if s.finished_by(fault_at):
            continue
        times = s.arrivals()
        prev = max([s.submitted_at, *[t for t in times if t <= fault_at]])
        after = [t for t in times if t > fault_at]
        if not after:
            out.append(None)
            continue
        recovered = 0.0
        for t in after:
            if t - prev >= min_gap_s and prev <= fault_end + min_gap_s:
                recovered = t - fault_at
            prev = t
        out.append(recovered)
    return out


def recovery_seconds(
    streams: Iterable[ClientStream], fault_at: float, fault_end: float, min_gap_s: float
) -> float | None:
    """Fault injected -> every stream that was in flight has received a frame again: the
    largest of `stream_recoveries` (0 if none stalled), None if one never recovered."""
    per_stream = stream_recoveries(streams, fault_at, fault_end, min_gap_s)
    if any(r is None for r in per_stream):
        return None
    return max([r for r in per_stream if r is not None], default=0.0)


@dataclass
class FaultResult:
    fault: str
    requests: int = 0
    in_flight: int = 0
    lost: int = 0
    duplicated: int = 0
    billing_mismatches: int = 0
    recovery_s: float | None = None
    outage_s: float = 0.0  # how long the fault itself lasted (broker down, stall)
    seconds: float = 0.0  # the whole phase
    dead_processes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # a few reasons, for the report
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.billing_mismatches == 0
            and self.recovery_s is not None
            and not self.dead_processes
            and self.in_flight > 0
        )


def tally(
    result: FaultResult, verdicts: Sequence[Verdict], quota: Sequence[str], max_examples: int = 5
) -> None:
    result.lost += sum(v.lost for v in verdicts)
    result.duplicated += sum(v.duplicated for v in verdicts)
    result.billing_mismatches += sum(v.billing_mismatch for v in verdicts) + len(quota)
    bad = [f"{v.request_id}: {'; '.join(v.reasons)}" for v in verdicts if v.reasons]
    result.examples += (bad + list(quota))[:max_examples]


def ledger_by_request(rows: Iterable[Sequence[Any]]) -> Mapping[str, LedgerRow]:
    """(request_id, rows, prompt_tokens, completion_tokens) tuples -> LedgerRow by id."""
    return {str(r[0]): LedgerRow(int(r[1]), int(r[2]), int(r[3])) for r in rows}


HEADER = (
    "| fault | requests in flight | lost | duplicated | billing mismatches | recovery s "
    "| outage s | processes |"
)


def table(results: Iterable[FaultResult]) -> str:
    """The Markdown table `llmstream chaos` prints (and README's Reliability section shows)."""
    rows = [HEADER, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        recovery = "never" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        procs = "all up" if not r.dead_processes else "died: " + ", ".join(r.dead_processes)
        rows.append(
            f"| {r.fault} | {r.in_flight} | {r.lost} | {r.duplicated} | {r.billing_mismatches} "
            f"| {recovery} | {r.outage_s:.1f} | {procs} |"
        )
    return "\n".join(rows)
