"""OpenTelemetry instruments of the model server, named and bucketed like vLLM's.

vLLM's ``vllm:<name>`` becomes ``llmstream_<name>`` here: OpenTelemetry instrument names
cannot contain ``:`` (see docs/metrics.md for the exact interval of each histogram). All
series carry the ``model_name`` attribute. Without a configured MeterProvider (tests,
benchmarks) the instruments are OpenTelemetry's no-ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry import metrics as otel_metrics

from llmstream.metric_buckets import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    TTFT_BUCKETS,
)

# (model_name, running, waiting) for every loaded model version.
LoadSource = Callable[[], Iterable[tuple[str, int, int]]]
InfoSource = Callable[[], Iterable[tuple[str, str, str, str]]]


class ServerMetrics:
    def __init__(self, meter: Any | None = None) -> None:
        m = meter if meter is not None else otel_metrics.get_meter("llmstream.model_server")
        self._load_source: LoadSource = lambda: ()
        self._info_source: InfoSource = lambda: ()

        def hist(name: str, desc: str, buckets: Sequence[float], unit: str = "s") -> Any:
            return m.create_histogram(
                name, unit=unit, description=desc, explicit_bucket_boundaries_advisory=buckets
            )

        self.ttft = hist(
            "llmstream_time_to_first_token_seconds",
            "Arrival at the engine -> first new token produced.",
            TTFT_BUCKETS,
        )
        self.itl = hist(
            "llmstream_inter_token_latency_seconds",
            "Time between two consecutive tokens of one sequence.",
            ITL_BUCKETS,
        )
        self.e2e = hist(
            "llmstream_e2e_request_latency_seconds",
            "Arrival at the engine -> finish (last token, stop or cancellation).",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue = hist(
            "llmstream_request_queue_time_seconds",
            "Arrival at the engine -> first scheduled on a decode slot.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill = hist(
            "llmstream_request_prefill_time_seconds",
            "First scheduled -> first new token (prompt and continuation evaluation).",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode = hist(
            "llmstream_request_decode_time_seconds",
            "First new token -> last token.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inference = hist(
            "llmstream_request_inference_time_seconds",
            "First scheduled -> finish.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prompt_tokens = hist(
            "llmstream_request_prompt_tokens",
            "Prompt tokens evaluated per request (prompt + continuation).",
            TOKEN_COUNT_BUCKETS,
            unit="1",
        )
        self.request_generation_tokens = hist(
            "llmstream_request_generation_tokens",
            "New tokens generated per request.",
            TOKEN_COUNT_BUCKETS,
            unit="1",
        )
        self.prompt_tokens = m.create_counter(
            "llmstream_prompt_tokens", unit="1", description="Prompt tokens evaluated."
        )
        self.generation_tokens = m.create_counter(
            "llmstream_generation_tokens", unit="1", description="New tokens generated."
        )
        self.request_success = m.create_counter(
            "llmstream_request_success",
            unit="1",
            description="Finished requests by finished_reason "
            "(stop, length, cancelled, error, timeout).",
        )
        self.rejected = m.create_counter(
            "llmstream_requests_rejected",
            unit="1",
            description="Generate calls refused before starting, by gRPC status code.",
        )
        m.create_observable_gauge(
            "llmstream_num_requests_running",
            callbacks=[self._observe_running],
            unit="1",
            description="Sequences holding a decode slot.",
        )
        m.create_observable_gauge(
            "llmstream_num_requests_waiting",
            callbacks=[self._observe_waiting],
            unit="1",
            description="Admitted sequences waiting for a decode slot.",
        )
        m.create_observable_gauge(
            "llmstream_model_info",
            callbacks=[self._observe_info],
            unit="1",
            description="1 per loaded model version (labels: model_name, version, engine, state).",
        )

    def bind(self, load_source: LoadSource, info_source: InfoSource) -> None:
        self._load_source = load_source
        self._info_source = info_source

    def _observe_running(self, _options: Any) -> Iterable[Any]:
        totals: dict[str, int] = {}
        for name, running, _waiting in self._load_source():
            totals[name] = totals.get(name, 0) + running
        return [otel_metrics.Observation(v, {"model_name": k}) for k, v in totals.items()]

    def _observe_waiting(self, _options: Any) -> Iterable[Any]:
        totals: dict[str, int] = {}
        for name, _running, waiting in self._load_source():
            totals[name] = totals.get(name, 0) + waiting
        return [otel_metrics.Observation(v, {"model_name": k}) for k, v in totals.items()]

    def _observe_info(self, _options: Any) -> Iterable[Any]:
        return [
            otel_metrics.Observation(1, {"model_name": n, "version": v, "engine": e, "state": s})
            for n, v, e, s in self._info_source()
        ]
