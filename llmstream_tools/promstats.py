"""Reading Prometheus text exposition without a Prometheus: sums over series, counter increases
between two scrapes, and histogram quantiles with Prometheus' own `histogram_quantile`
interpolation. Pure functions, no I/O (`llmstream top` does the scraping).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]  # (sample name, sorted labels)


@dataclass
class Scrape:
    at: float = 0.0  # monotonic time of the scrape (seconds)
    samples: dict[SeriesKey, float] = field(default_factory=dict)

    def series(self, name: str, where: Mapping[str, str] | None = None) -> dict[Labels, float]:
        """Samples named `name` (e.g. `x_total`, `x_bucket`) whose labels include `where`."""
        want = tuple((where or {}).items())
        out = {}
        for (n, labels), value in self.samples.items():
            if n == name and all(kv in labels for kv in want):
                out[labels] = value
        return out


def parse(text: str, at: float = 0.0, extra: Mapping[str, str] | None = None) -> Scrape:
    """One target's `/metrics`; `extra` labels (e.g. the target's address) are added to every
    series so scrapes of several replicas can be merged without collisions."""
    scrape = Scrape(at)
    add = tuple((extra or {}).items())
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((*s.labels.items(), *add)))
            scrape.samples[(s.name, labels)] = float(s.value)
    return scrape


def merge(scrapes: Iterable[Scrape]) -> Scrape:
    """Several targets' scrapes as one (series must be distinct: see `parse(extra=...)`)."""
    out = Scrape()
    times = []
    for s in scrapes:
        out.samples.update(s.samples)
        times.append(s.at)
    out.at = max(times, default=0.0)
    return out


def total(scrape: Scrape, name: str, where: Mapping[str, str] | None = None) -> float | None:
    """Sum over every matching series, None if there is none."""
    values = scrape.series(name, where).values()
    return sum(values) if values else None


def maximum(scrape: Scrape, name: str) -> float | None:
    values = scrape.series(name).values()
    return max(values) if values else None


def by_label(scrape: Scrape, name: str, label: str) -> dict[str, float]:
    """Sum per value of `label` (series without it are left out)."""
    out: dict[str, float] = {}
    for labels, value in scrape.series(name).items():
        key = dict(labels).get(label)
        if key is not None:
            out[key] = out.get(key, 0.0) + value
    return out


def _increase(now: float, before: float | None) -> float:
    # A counter lower than before was reset (process restart): it counted `now` since.
    if before is None or now < before:
        return now
    return now - before


def increase(
    now: Scrape, before: Scrape, name: str, where: Mapping[str, str] | None = None
) -> float | None:
    """How much a counter grew between two scrapes, summed over series (reset-aware)."""
    current = now.series(name, where)
    if not current:
        return None
    previous = before.series(name, where)
    return sum(_increase(v, previous.get(k)) for k, v in current.items())


def increase_by_label(now: Scrape, before: Scrape, name: str, label: str) -> dict[str, float]:
    previous = before.series(name)
    out: dict[str, float] = {}
    for labels, value in now.series(name).items():
        key = dict(labels).get(label)
        if key is not None:
            out[key] = out.get(key, 0.0) + _increase(value, previous.get(labels))
    return out


def buckets(
    scrape: Scrape, histogram: str, before: Scrape | None = None
) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) of a histogram summed over its series, sorted by bound;
    with `before`, only the observations made between the two scrapes."""
    previous = before.series(histogram + "_bucket") if before is not None else {}
    summed: dict[float, float] = {}
    for labels, value in scrape.series(histogram + "_bucket").items():
        le = float(dict(labels)["le"])
        summed[le] = summed.get(le, 0.0) + (
            _increase(value, previous.get(labels)) if before is not None else value
        )
    return sorted(summed.items())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the
    rank; the highest finite bound if the rank falls in the +Inf bucket; None without data."""
    if not cumulative or cumulative[-1][0] != math.inf:
        return None
    count = cumulative[-1][1]
    if count <= 0:
        return None
    rank = q * count
    prev_bound, prev_count = 0.0, 0.0
    for i, (bound, n) in enumerate(cumulative):
        if n >= rank:
            if bound == math.inf:
                return cumulative[-2][0] if i > 0 else None
            if i == 0 and bound <= 0:
                return bound
            if n == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (n - prev_count)
        prev_bound, prev_count = bound, n
    return None
