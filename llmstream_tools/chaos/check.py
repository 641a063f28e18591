"""Verdicts of one fault phase, from what was observed (pure: no I/O; unit-tested).

Inputs: per request, what its client received (token frames with arrival times, `done` and
`error` frames), the expected text (the synthetic engine's uninterrupted output for the
prompt), the request's folded state from the event log and its ledger rows; per tenant, the
ledger, `usage_daily`, the Redis quota counters and the aggregator's duplicate-bill counter;
per fault, the evidence that it took effect.

A request is **kept** only if its client got exactly one `done`, with finish `stop` or
`length`, and the full expected text, every seq once and without a gap, the log agrees (one
terminal event, no missing seq, the same text) and it is billed once with the
log's usage. Anything else is counted in its own column, so a fault that turns streams into
`error` endings, empty texts or retried errors can never pass:

- `failed`: `done` with another finish (`error`, `timeout`, `cancelled`, ...);
- `truncated`: `stop`/`length` with a proper prefix of the expected text (an empty one too);
- `wrong text`: a text that is not a prefix of the expected one (or the log's text differs);
- `missing done`: no `done` frame;
- `error frames` (every one is counted; one without `retry_after_ms`, which a client cannot act
  on, fails the fault), `repeated seq` (a seq or `done` received twice, or two terminal events
  in the log), `gapped seq` (a seq missing on the client or in the log): flags on top of the
  outcome;
- billing: `double bills` (anything billed twice: ledger rows, `usage_daily` above the ledger,
  Redis counters above it once all is settled, the aggregator's duplicate-bill counter) and
  `billing mismatches` (every other disagreement, e.g. a `done` without a terminal event in
  the log: an answer nobody bills).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmstream.fold import RequestState
from llmstream_tools.chaos.recovery import GOALS, Spread, goal_verdict

# Finish reasons of a request that ran to its end: its text must be the whole expected text.
COMPLETE = ("length", "stop")

# Outcome columns, in table order; exactly one per request.
KEPT = "kept"
FAILED = "failed"
TRUNCATED = "truncated"
WRONG_TEXT = "wrong text"
MISSING_DONE = "missing done"
OUTCOMES = (KEPT, FAILED, TRUNCATED, WRONG_TEXT, MISSING_DONE)


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
    outcome: str = KEPT
    error_frames: int = 0
    unhinted_errors: int = 0  # error frames without retry_after_ms
    repeated_seq: bool = False
    gapped_seq: bool = False
    double_bill: bool = False
    billing_mismatch: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return self.outcome == KEPT


def judge_request(
    stream: ClientStream,
    expected: str,
    logged: RequestState | None,
    ledger: LedgerRow | None,
) -> Verdict:
    v = Verdict(stream.request_id)

    def outcome(label: str, why: str) -> None:
        # The first (most basic) failure names the outcome; every reason is kept.
        if v.outcome == KEPT:
            v.outcome = label
        v.reasons.append(why)

    def flag(name: str, why: str) -> None:
        setattr(v, name, True)
        v.reasons.append(why)

    seqs = [s for _, s, _ in stream.tokens]
    unique = set(seqs)
    if len(seqs) != len(unique):
        flag("repeated_seq", f"client got {len(seqs) - len(unique)} repeated seq(s)")
    if len(stream.dones) > 1:
        flag("repeated_seq", f"client got {len(stream.dones)} done frames")
    if unique != set(range(1, len(unique) + 1)):
        flag("gapped_seq", "client seqs have a gap")
    if stream.errors:
        v.error_frames = len(stream.errors)
        v.unhinted_errors = sum(e.get("retry_after_ms") is None for e in stream.errors)
        codes = sorted({str(e.get("code")) for e in stream.errors})
        v.reasons.append(f"client got {len(stream.errors)} error frame(s): {', '.join(codes)}")
    # The text in seq order with repeats dropped: a repeat is reported as such, not as a
    # wrong text too.
    by_seq = {s: t for _, s, t in reversed(stream.tokens)}
    text = "".join(by_seq[s] for s in sorted(by_seq))
    done = stream.done
    if done is None:
        outcome(MISSING_DONE, "client got no done")
    else:
        reason = str(done.get("finish_reason"))
        if int(done.get("last_seq", -1)) != len(unique):
            flag("gapped_seq", f"done.last_seq {done.get('last_seq')} but {len(unique)} seqs")
        if not expected.startswith(text):
            outcome(WRONG_TEXT, f"{reason}: text is not a prefix of the expected text")
        elif reason not in COMPLETE:
            code = done.get("error_code")
            outcome(FAILED, f"finish {reason}" + (f" ({code})" if code else ""))
        elif text != expected:
            outcome(TRUNCATED, f"{reason} with {len(text)} of {len(expected)} chars")
    if logged is None or not logged.terminal:
        if done is not None:  # an answer nobody will bill
            flag("billing_mismatch", "client got done but the log has no terminal event")
    else:
        if logged.extra_terminals:
            flag("repeated_seq", f"log has {1 + logged.extra_terminals} terminal events")
        if logged.missing_seqs:
            flag("gapped_seq", f"log misses {logged.missing_seqs} seq(s)")
        if done is not None and logged.text != text:
            outcome(WRONG_TEXT, "client text differs from the log's")
    _judge_bill(v, logged, ledger)
    return v


def _judge_bill(v: Verdict, logged: RequestState | None, ledger: LedgerRow | None) -> None:
    rows = ledger.rows if ledger is not None else 0
    if logged is None or not logged.terminal:
        if rows:
            v.billing_mismatch = True
            v.reasons.append(f"{rows} ledger row(s) without a terminal event")
        return
    if rows > 1:
        v.double_bill = True
        v.reasons.append(f"{rows} ledger rows for one request")
    elif rows == 0 or ledger is None:
        v.billing_mismatch = True
        v.reasons.append("terminal event never billed")
    elif (ledger.prompt_tokens, ledger.completion_tokens) != (
        logged.prompt_tokens,
        logged.completion_tokens,
    ):
        v.billing_mismatch = True
        v.reasons.append(
            f"ledger usage {ledger.prompt_tokens}+{ledger.completion_tokens} != log "
            f"{logged.prompt_tokens}+{logged.completion_tokens}"
        )


@dataclass
class TenantBilling:
    """One tenant's billing state after every request ended and was settled: the ledger's
    sums, the `usage_daily` rollup's, the Redis quota counters and the increase of the
    aggregator's `llmstream_aggregator_duplicate_bills` counter over the phase."""

    ledger_rows: int
    ledger_tokens: int
    daily_requests: int
    daily_tokens: int
    redis_day: int
    redis_month: int
    settled: int  # members of the tenant's settled set
    open_streams: int
    duplicate_bill_counter: int


@dataclass
class BillingFindings:
    double_bills: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def judge_tenant(b: TenantBilling) -> BillingFindings:
    """Every store must hold what the ledger holds, no more (a double bill) and no less."""
    out = BillingFindings()

    def compare(what: str, value: int, ledger: int, unit: str) -> None:
        if value > ledger:
            out.double_bills.append(f"{what} {value} > ledger {ledger} {unit}")
        elif value < ledger:
            out.mismatches.append(f"{what} {value} < ledger {ledger} {unit}")

    compare("usage_daily", b.daily_requests, b.ledger_rows, "requests")
    compare("usage_daily", b.daily_tokens, b.ledger_tokens, "tokens")
    compare("settled set", b.settled, b.ledger_rows, "requests")
    # Counters hold reservations of unsettled requests too: above the ledger is a double
    # settlement only once nothing is open.
    for window, counter in (("day", b.redis_day), ("month", b.redis_month)):
        if counter > b.ledger_tokens and b.open_streams:
            out.mismatches.append(f"Redis {window} counter {counter} holds open reservations")
        else:
            compare(f"Redis {window} counter", counter, b.ledger_tokens, "tokens")
    if b.open_streams:
        out.mismatches.append(f"{b.open_streams} stream slot(s) still held")
    if b.duplicate_bill_counter:
        out.double_bills.append(f"aggregator refused {b.duplicate_bill_counter} duplicate bill(s)")
    return out


# ---------------------------------------------------------------------------- new submits


@dataclass
class Probe:
    """A submit made while the fault was going on: `stream` once accepted, `refusal` (the
    error frame) once refused, neither if it was never answered."""

    ref: str
    prompt: str
    stream: ClientStream | None = None
    refusal: dict[str, Any] | None = None


def judge_probe(probe: Probe, verdict: Verdict | None) -> str:
    """`served` (accepted and kept), `refused` (an error frame a client can act on: it carries
    `retry_after_ms`, the protocol's "retry the same frame later"), or `bad: <why>`."""
    if probe.refusal is not None:
        if probe.refusal.get("retry_after_ms") is not None:
            return "refused"
        return f"bad: refused with {probe.refusal.get('code')} and no retry_after_ms"
    if probe.stream is None or verdict is None:
        return "bad: never answered"
    if verdict.kept:
        return "served"
    return f"bad: accepted, then {verdict.outcome} ({'; '.join(verdict.reasons)})"


# ---------------------------------------------------------------------------- fault proofs


def process_killed(exit_code: int | None, alive_after: bool, port_open_after: bool | None) -> str:
    """'' if a kill -9 took effect (exit status -9 when the process is a child, the pid gone,
    its port closed when it has one), else what contradicts it."""
    if exit_code is not None and exit_code != -9:
        return f"exit status {exit_code}, not -9"
    if alive_after:
        return "pid still alive after the kill"
    if port_open_after:
        return "its port still accepted connections"
    return ""


def server_restarted(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """'' if a server restarted: its pid, run id or start time changed (Redis `INFO`
    run_id/uptime, PostgreSQL postmaster pid/start time, a broker's pid), else why not."""
    changed = [k for k in before if k in after and before[k] != after[k]]
    if not changed:
        return f"unchanged: {dict(before)}"
    uptime_before, uptime_after = before.get("uptime_s"), after.get("uptime_s")
    if changed == ["uptime_s"] and uptime_after is not None and uptime_after >= uptime_before:
        return f"uptime grew {uptime_before} -> {uptime_after}: no restart"
    return ""


# ---------------------------------------------------------------------------- one fault


@dataclass
class FaultResult:
    fault: str
    requests: int = 0
    in_flight: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    error_frames: int = 0
    unhinted_errors: int = 0  # error frames without retry_after_ms
    repeated_seq: int = 0
    gapped_seq: int = 0
    double_bills: int = 0
    billing_mismatches: int = 0
    # New submits while the fault went on: served / refused / bad.
    probes: dict[str, int] = field(default_factory=lambda: {"served": 0, "refused": 0, "bad": 0})
    proof: str = "not checked"  # "" once every piece of evidence agrees
    stall: Spread = field(default_factory=Spread)  # longest silence per in-flight stream
    goal: str = ""  # a GOALS key, if the issue sets one for this fault
    goal_measure: Spread | None = None  # what the goal bounds (stall, unless said otherwise)
    outage_s: float = 0.0  # how long the injection itself took (broker down, stall)
    seconds: float = 0.0  # the whole phase
    dead_processes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # a few reasons, for the report
    extra: dict[str, Any] = field(default_factory=dict)
    # Why the fault could not be made on this machine (a link fault where namespaces are
    # refused); nothing else of the result is measured then.
    skipped: str = ""

    @property
    def kept(self) -> int:
        return self.outcomes[KEPT]

    @property
    def proven(self) -> bool:
        return self.proof == ""

    @property
    def goal_result(self) -> str:
        if not self.goal:
            return ""
        return goal_verdict(self.goal, self.goal_measure or self.stall)

    @property
    def ok(self) -> bool:
        """Correctness: every request kept, no error frame a client cannot act on, nothing
        billed twice or wrongly, every new submit served or refused properly, the fault proven,
        no process died. Recovery goals are reported beside it (`goal_result`). A skipped
        fault passes: the run says so in its own column and in the summary."""
        if self.skipped:
            return True
        return (
            self.requests > 0
            and self.in_flight > 0
            and self.kept == self.requests
            and self.unhinted_errors == 0
            and self.repeated_seq == 0
            and self.gapped_seq == 0
            and self.double_bills == 0
            and self.billing_mismatches == 0
            and self.probes["bad"] == 0
            and self.proven
            and not self.dead_processes
        )


def tally(
    result: FaultResult,
    verdicts: Sequence[Verdict],
    tenant: BillingFindings,
    probes: Sequence[tuple[str, Verdict | None]] = (),
    max_examples: int = 6,
) -> None:
    """Add the request verdicts, the tenant's billing findings and the probes' outcomes
    (`judge_probe`'s label with the accepted probe's verdict: its bill counts too)."""
    for v in verdicts:
        result.outcomes[v.outcome] += 1
        result.error_frames += v.error_frames
        result.unhinted_errors += v.unhinted_errors
        result.repeated_seq += v.repeated_seq
        result.gapped_seq += v.gapped_seq
    billed = [*verdicts, *(v for _, v in probes if v is not None)]
    result.double_bills += sum(v.double_bill for v in billed) + len(tenant.double_bills)
    result.billing_mismatches += sum(v.billing_mismatch for v in billed) + len(tenant.mismatches)
    for label, _ in probes:
        result.probes[label.split(":")[0]] += 1
    bad = [f"{v.request_id}: {'; '.join(v.reasons)}" for v in verdicts if v.reasons]
    findings = [*tenant.double_bills, *tenant.mismatches, *(p for p, _ in probes if ":" in p)]
    result.examples += (findings + bad)[:max_examples]


def ledger_by_request(rows: Iterable[Sequence[Any]]) -> Mapping[str, LedgerRow]:
    """(request_id, rows, prompt_tokens, completion_tokens) tuples -> LedgerRow by id."""
    return {str(r[0]): LedgerRow(int(r[1]), int(r[2]), int(r[3])) for r in rows}


# ---------------------------------------------------------------------------- the table

COLUMNS = (
    "fault",
    "requests",
    "in flight",
    "kept",
    "failed",
    "truncated",
    "wrong text",
    "missing done",
    "error frames",
    "repeated seq",
    "gapped seq",
    "double bills",
    "billing mismatches",
    "new submits served/refused/bad",
    "stall s p50/p99/max",
    "goal",
    "fault proven",
    "processes",
)


def row(r: FaultResult) -> list[str]:
    goal = f"{r.goal_result} ≤ {GOALS[r.goal].limit_s:g} s" if r.goal else ""
    if r.goal and r.goal_measure is not None:
        goal += f" ({r.goal_measure.text()})"
    return [
        r.fault,
        str(r.requests),
        str(r.in_flight),
        str(r.kept),
        *(str(r.outcomes[o]) for o in OUTCOMES[1:]),
        str(r.error_frames)
        + (f" ({r.unhinted_errors} without retry hint)" * bool(r.unhinted_errors)),
        str(r.repeated_seq),
        str(r.gapped_seq),
        str(r.double_bills),
        str(r.billing_mismatches),
        f"{r.probes['served']}/{r.probes['refused']}/{r.probes['bad']}",
        r.stall.text(),
        goal,
        f"SKIPPED: {r.skipped}" if r.skipped else "yes" if r.proven else f"NO: {r.proof}",
        "all up" if not r.dead_processes else "died: " + ", ".join(r.dead_processes),
    ]


def table(results: Iterable[FaultResult]) -> str:
    """The Markdown table `llmstream chaos` prints (and README's Reliability section shows)."""
    align = [
        "---" if c in ("fault", "goal", "fault proven", "processes") else "---:" for c in COLUMNS
    ]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)
