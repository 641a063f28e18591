"""OpenTelemetry instruments of the gateway, served at `/metrics` on its own port
(`LLMSTREAM_GATEWAY_METRICS_PORT`, never the public one).

The hot path (every token event, every frame) only bumps plain ints on `GatewayMetrics`;
observable instruments read them when Prometheus scrapes, so counting costs nothing per token.
Latencies seen by the client are histograms recorded once per request. Every series carries
`gateway_id`: tests run several replicas in one process, and the label keeps them apart (in a
deployment it is one value per process). docs/metrics.md lists every series and interval.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics

# The model server's vLLM TTFT boundaries (1 ms ... 2560 s): client-side and engine-side TTFT
# line up bucket by bucket. End-to-end latency uses them too: vLLM's request-latency buckets
# start at 0.3 s, too coarse for streams that finish in tens of milliseconds.
from llmstream.metric_buckets import TTFT_BUCKETS

# Label values that exist from the start (at 0), so rate() and alerts see them before the
# first occurrence.
SUBMIT_RESULTS = (
    "accepted",
    "idempotent",
    "quota",
    "overloaded",
    "draining",
    "model",
    "failed",
    "unknown",
)
RESUME_KINDS = ("owned", "borrowed")
RESUME_REFUSALS = ("slots", "deadline")
CANCEL_RESULTS = ("written", "duplicate", "finished")
LIMITED_FRAMES = ("cancel", "resume")
# The outcomes a request may end with (finish reasons, failure codes of docs/protocol.md);
# anything else an event names (its code is a free string) is counted as "other", so that no
# event can add series.
OUTCOMES = frozenset(
    {
        "stop",
        "length",
        "cancelled",
        "error",
        "content_filter",
        "timeout",
        "unspecified",
        "failed",
        "invalid_request",
        "model_not_found",
        "model_unavailable",
        "context_overflow",
        "internal",
    }
)


def outcome_label(outcome: str) -> str:
    return outcome if outcome in OUTCOMES else "other"


QUOTA_LIMITS = (
    "concurrent_streams",
    "requests_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "sockets",
)


class GatewayMetrics:
    """Counts of one gateway replica. Bump the attributes directly; `record_*` for latencies."""

    def __init__(
        self,
        gateway_id: str,
        sockets: Callable[[], int],
        inflight: Callable[[], int],
        meter: Any | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.sockets = sockets
        self.inflight = inflight
        self.prompt_lag = 0
        self.token_events = 0
        self.frames_sent = 0
        self.invalid_frames = 0
        self.send_buffer_overflows = 0
        self.grace_cancels = 0
        self.foreign_events = 0
        self.submits: Counter[str] = Counter(dict.fromkeys(SUBMIT_RESULTS, 0))
        self.requests: Counter[str] = Counter()
        self.resumes: Counter[str] = Counter(dict.fromkeys(RESUME_KINDS, 0))
        self.resume_refusals: Counter[str] = Counter(dict.fromkeys(RESUME_REFUSALS, 0))
        self.cancels: Counter[str] = Counter(dict.fromkeys(CANCEL_RESULTS, 0))
        self.rate_limited: Counter[str] = Counter(dict.fromkeys(LIMITED_FRAMES, 0))
        self.quota_refusals: Counter[str] = Counter(dict.fromkeys(QUOTA_LIMITS, 0))
        self.attrs = {"gateway_id": gateway_id}
        if meter is None:
            # One set of instruments per process (the SDK ignores the callbacks of a second
            # instrument with the same name); its callbacks report every live replica.
            global _shared
            _live.add(self)
            if _shared is None:
                _shared = _Instruments(otel_metrics.get_meter("llmstream.gateway"), _live_list)
            self._instruments = _shared
        else:
            self._instruments = _Instruments(meter, lambda: [self])

    def record_ttft(self, seconds: float) -> None:
        self._instruments.ttft.record(seconds, self.attrs)

    def record_e2e(self, seconds: float) -> None:
        self._instruments.e2e.record(seconds, self.attrs)


_live: weakref.WeakSet[GatewayMetrics] = weakref.WeakSet()
_shared: _Instruments | None = None


def _live_list() -> list[GatewayMetrics]:
    return list(_live)


Observations = Iterable[otel_metrics.Observation]


class _Instruments:
    def __init__(self, m: Any, replicas: Callable[[], list[GatewayMetrics]]) -> None:
        self._replicas = replicas

        def value(read: Callable[[GatewayMetrics], float]) -> Callable[[Any], Observations]:
            return lambda _options: [
                otel_metrics.Observation(read(g), g.attrs) for g in self._replicas()
            ]

        def by_label(
            label: str, read: Callable[[GatewayMetrics], Counter[str]]
        ) -> Callable[[Any], Observations]:
            return lambda _options: [
                otel_metrics.Observation(n, {**g.attrs, label: k})
                for g in self._replicas()
                for k, n in list(read(g).items())
            ]

        Read = Callable[[GatewayMetrics], float]
        Labelled = Callable[[GatewayMetrics], Counter[str]]
        gauges: list[tuple[str, str, Read]] = [
            ("gateway_sockets", "Open WebSockets.", lambda g: g.sockets()),
            (
                "gateway_inflight_requests",
                "Requests accepted by this replica whose terminal event it has not read yet.",
                lambda g: g.inflight(),
            ),
            (
                "gateway_prompt_lag",
                "Prompts in the log not yet committed by the workers (0 unless "
                "LLMSTREAM_GATEWAY_MAX_PROMPT_LAG is set).",
                lambda g: g.prompt_lag,
            ),
        ]
        by_label_counters: list[tuple[str, str, str, Labelled]] = [
            (
                "gateway_submits",
                "Submit frames by result (accepted, idempotent, quota, overloaded, draining, model, "
                "failed, unknown: the prompt write timed out, the request may run).",
                "result",
                lambda g: g.submits,
            ),
            (
                "gateway_requests",
                "Requests accepted here that ended, by outcome (finish reason or failure code).",
                "outcome",
                lambda g: g.requests,
            ),
            (
                "gateway_resumes",
                "Resumes by kind (owned: own partition; borrowed: another replica's).",
                "kind",
                lambda g: g.resumes,
            ),
            (
                "gateway_resume_refusals",
                "Resumes ended by a bound: `slots` (no catch-up slot free, or the tenant holds its "
                "share), `deadline` (the catch-up outlasted its deadline).",
                "reason",
                lambda g: g.resume_refusals,
            ),
            (
                "gateway_cancels",
                "Client cancels by result: `written` (a cancel_requested event), `duplicate` "
                "(already requested: no write), `finished` (answered from state: no write).",
                "result",
                lambda g: g.cancels,
            ),
            (
                "gateway_rate_limited_frames",
                "Cancel and resume frames (and their HTTP routes) refused by a rate limit, by "
                "frame.",
                "frame",
                lambda g: g.rate_limited,
            ),
            (
                "gateway_quota_refusals",
                "Submits and upgrades refused by a tenant quota, by limit.",
                "limit",
                lambda g: g.quota_refusals,
            ),
        ]
        counters: list[tuple[str, str, Read]] = [
            (
                "gateway_send_buffer_overflows",
                "Sockets closed with 4008 because their send buffer was full.",
                lambda g: g.send_buffer_overflows,
            ),
            ("gateway_frames_sent", "Frames written to sockets.", lambda g: g.frames_sent),
            (
                "gateway_invalid_frames",
                "Client frames refused by the protocol parser.",
                lambda g: g.invalid_frames,
            ),
            (
                "gateway_token_events",
                "Events read from this replica's tokens partitions.",
                lambda g: g.token_events,
            ),
            (
                "gateway_foreign_events",
                "Events of a followed request naming another tenant than its follower's: "
                "dropped, never delivered.",
                lambda g: g.foreign_events,
            ),
            (
                "gateway_grace_cancels",
                "Requests cancelled because nobody followed them after the disconnect grace "
                "period.",
                lambda g: g.grace_cancels,
            ),
        ]
        for name, desc, read in gauges:
            m.create_observable_gauge(name, callbacks=[value(read)], unit="1", description=desc)
        for name, desc, label, labelled in by_label_counters:
            m.create_observable_counter(
                name, callbacks=[by_label(label, labelled)], unit="1", description=desc
            )
        for name, desc, read in counters:
            m.create_observable_counter(name, callbacks=[value(read)], unit="1", description=desc)
        self.ttft = m.create_histogram(
            "gateway_time_to_first_token_seconds",
            unit="s",
            description="Submit frame read -> first token frame queued on the same socket.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.e2e = m.create_histogram(
            "gateway_e2e_request_latency_seconds",
            unit="s",
            description="Submit frame read -> done frame queued on the same socket.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
