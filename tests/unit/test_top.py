"""`llmstream top`'s pure parts: Prometheus text parsing, counter increases across restarts,
histogram quantiles (Prometheus' histogram_quantile), the summary and its rendering."""

from __future__ import annotations

import math

import pytest

from llmstream import config
from llmstream_tools import local_ports, promstats, top

HIST = """\
# HELP h_seconds x
# TYPE h_seconds histogram
h_seconds_bucket{le="0.1",m="a"} {a1}
h_seconds_bucket{le="0.2",m="a"} {a2}
h_seconds_bucket{le="0.4",m="a"} {a3}
h_seconds_bucket{le="+Inf",m="a"} {a4}
h_seconds_count{m="a"} {a4}
h_seconds_sum{m="a"} 1
h_seconds_bucket{le="0.1",m="b"} 0
h_seconds_bucket{le="0.2",m="b"} 0
h_seconds_bucket{le="0.4",m="b"} {b3}
h_seconds_bucket{le="+Inf",m="b"} {b3}
h_seconds_count{m="b"} {b3}
h_seconds_sum{m="b"} 1
"""


def hist(a: tuple[int, int, int, int], b3: int) -> str:
    text = HIST
    for name, v in zip(("a1", "a2", "a3", "a4"), a, strict=True):
        text = text.replace("{" + name + "}", str(v))
    return text.replace("{b3}", str(b3))


def test_buckets_sum_series_and_quantiles_interpolate_like_prometheus() -> None:
    s = promstats.parse(hist((10, 20, 30, 30), 10))
    b = promstats.buckets(s, "h_seconds")
    assert b == [(0.1, 10), (0.2, 20), (0.4, 40), (math.inf, 40)]
    # rank 20 of 40 falls at the top of the 0.1-0.2 bucket; rank 30 halfway into 0.2-0.4.
    assert promstats.quantile(0.5, b) == pytest.approx(0.2)
    assert promstats.quantile(0.75, b) == pytest.approx(0.3)
    assert promstats.quantile(0.125, b) == pytest.approx(0.05)  # first bucket starts at 0


def test_quantile_edge_cases() -> None:
    assert promstats.quantile(0.5, []) is None
    assert promstats.quantile(0.5, [(0.1, 0), (math.inf, 0)]) is None  # no observations
    # Everything above the highest bound: Prometheus answers that bound.
    assert promstats.quantile(0.99, [(0.1, 0), (0.2, 0), (math.inf, 5)]) == 0.2


def test_window_buckets_and_counters_survive_a_restart() -> None:
    before = promstats.parse(hist((10, 20, 30, 30), 10) + "c_total 100\n")
    # Series a grew by 10 observations in the 0.2-0.4 bucket; series b restarted (fewer
    # observations than before): everything it has now is new.
    now = promstats.parse(hist((10, 20, 40, 40), 4) + "c_total 7\n")
    b = promstats.buckets(now, "h_seconds", before)
    assert b == [(0.1, 0), (0.2, 0), (0.4, 14), (math.inf, 14)]
    assert promstats.increase(now, before, "c_total") == 7
    grown = promstats.parse("c_total 130\n")
    assert promstats.increase(grown, before, "c_total") == 30
    assert promstats.increase(grown, before, "missing_total") is None


def test_merge_keeps_replicas_apart() -> None:
    one = promstats.parse("g 2\n", extra={"instance": "w1"})
    two = promstats.parse("g 3\n", extra={"instance": "w2"})
    merged = promstats.merge([one, two])
    assert promstats.total(merged, "g") == 5
    assert promstats.maximum(merged, "g") == 3
    assert promstats.by_label(merged, "g", "instance") == {"w1": 2, "w2": 3}


GATEWAY = """\
# TYPE gateway_sockets gauge
gateway_sockets{{gateway_id="g"}} 3
# TYPE gateway_requests_total counter
gateway_requests_total{{gateway_id="g",outcome="length"}} {length}
gateway_requests_total{{gateway_id="g",outcome="model_unavailable"}} {failed}
# TYPE gateway_invalid_frames_total counter
gateway_invalid_frames_total{{gateway_id="g"}} 0
"""
MODEL = """\
# TYPE llmstream_generation_tokens_total counter
llmstream_generation_tokens_total{{model_name="m"}} {tokens}
# TYPE llmstream_num_requests_running gauge
llmstream_num_requests_running{{model_name="m"}} 4
# TYPE llmstream_inter_token_latency_seconds histogram
llmstream_inter_token_latency_seconds_bucket{{le="0.01",model_name="m"}} {itl_fast}
llmstream_inter_token_latency_seconds_bucket{{le="0.02",model_name="m"}} {itl_all}
llmstream_inter_token_latency_seconds_bucket{{le="+Inf",model_name="m"}} {itl_all}
llmstream_inter_token_latency_seconds_count{{model_name="m"}} {itl_all}
llmstream_inter_token_latency_seconds_sum{{model_name="m"}} 1
"""


def scrapes(
    at: float, length: int, failed: int, tokens: int, fast: int, all_: int
) -> dict[str, promstats.Scrape]:
    return {
        "gateway": promstats.parse(GATEWAY.format(length=length, failed=failed), at),
        "model_server": promstats.parse(
            MODEL.format(tokens=tokens, itl_fast=fast, itl_all=all_), at
        ),
    }


def test_summary_rates_and_percentiles_cover_the_window() -> None:
    before = scrapes(10.0, length=100, failed=1, tokens=1000, fast=100, all_=100)
    now = scrapes(12.0, length=140, failed=1, tokens=1600, fast=100, all_=200)
    s = top.summarize(now, before)
    assert s["window_s"] == 2.0
    assert s["gateway"]["sockets"] == 3
    assert s["gateway"]["requests_total"] == 141
    assert s["gateway"]["requests_per_s"] == 20.0
    assert s["gateway"]["outcomes"] == {"length": 20.0, "model_unavailable": 0.0}
    assert s["model_server"]["tokens_per_s"] == 300.0
    assert s["model_server"]["running"] == 4
    # The window's 100 ITL observations are all in 0.01-0.02: p50 at its middle.
    assert s["model_server"]["itl"]["p50"] == pytest.approx(0.015)
    assert s["errors"] == {"gateway failed requests": 1}
    assert "worker" not in s  # not scraped: no line rather than zeros

    text = top.render(s, {"127.0.0.1:9103": "Connection refused"})
    lines = text.splitlines()
    assert "over the last 2.0s" in lines[0]
    assert any(ln.startswith("gateway") and "requests 20.0/s, 141 total" in ln for ln in lines), (
        text
    )
    assert any(ln.startswith("model server") and "itl p50 15ms p99 20ms" in ln for ln in lines), (
        text
    )
    assert "errors        gateway failed requests 1  (totals)" in lines
    assert lines[-1] == "unreachable   127.0.0.1:9103: Connection refused"


def test_summary_without_a_window_has_totals_and_lifetime_percentiles() -> None:
    s = top.summarize(scrapes(1.0, length=5, failed=0, tokens=50, fast=5, all_=10))
    assert s["window_s"] is None
    assert s["gateway"]["requests_per_s"] is None
    assert s["gateway"]["outcomes"] == {"length": 5, "model_unavailable": 0}
    assert s["model_server"]["itl"]["p50"] == pytest.approx(0.01)
    assert s["errors"] == {}
    assert "errors        none" in top.render(s).splitlines()


def test_default_targets_are_where_make_up_serves_metrics() -> None:
    t = top.default_targets()
    # The gateway's /metrics is never its public port: `llmstream up` gives it one of its own.
    assert t["gateway"] == [f"127.0.0.1:{local_ports.gateway_metrics_port()}"]
    assert local_ports.gateway_metrics_port() != config.get_int("GATEWAY_PORT")
    assert t["model_server"] == [f"127.0.0.1:{config.get('MODEL_SERVER_METRICS_PORT')}"]
    assert t["worker"] == [f"127.0.0.1:{config.get('WORKER_METRICS_PORT')}"]
    assert t["aggregator"] == [f"127.0.0.1:{config.get('AGGREGATOR_METRICS_PORT')}"]
    assert top.url_of("127.0.0.1:9103") == "http://127.0.0.1:9103/metrics"
    assert top.url_of("http://h:1/metrics") == "http://h:1/metrics"


def test_unreachable_targets_are_reported_not_raised() -> None:
    from llmstream.ports import free_port

    port = free_port()
    scraped, errors = top.scrape({"worker": [f"127.0.0.1:{port}"]}, timeout_s=1)
    assert scraped == {}
    assert list(errors) == [f"127.0.0.1:{port}"]
