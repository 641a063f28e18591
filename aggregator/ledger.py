"""Prices and the cost of a bill (pure).

`prices` rows are effective-dated: the price of a model at time t is the row with the latest
`effective_from <= t`. A model without its own row uses the wildcard model `*`, if any. A bill
with no effective price gets cost None (the ledger row is still written, flagged unpriced, so
usage is never lost because a price is missing).

Cost = prompt_tokens * prompt_per_1k / 1000 + completion_tokens * completion_per_1k / 1000,
in Decimal, rounded half-even to 9 decimal places (the ledger column is numeric(20, 9)).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

WILDCARD = "*"
QUANTUM = Decimal("0.000000001")
_THOUSAND = Decimal(1000)


@dataclass(frozen=True)
class Price:
    model: str
    effective_from: dt.datetime
    prompt_per_1k: Decimal
    completion_per_1k: Decimal
    currency: str = "USD"


@dataclass(frozen=True)
class Cost:
    amount: Decimal
    currency: str
    price_effective_from: dt.datetime


class PriceBook:
    """Prices of some models, searchable by time."""

    def __init__(self, prices: Iterable[Price]) -> None:
        by_model: dict[str, list[Price]] = {}
        for p in prices:
            by_model.setdefault(p.model, []).append(p)
        self._by_model = {
            m: sorted(ps, key=lambda p: p.effective_from) for m, ps in by_model.items()
        }
        self._starts = {m: [p.effective_from for p in ps] for m, ps in self._by_model.items()}

    def lookup(self, model: str, at: dt.datetime) -> Price | None:
        for name in (model, WILDCARD):
            prices = self._by_model.get(name)
            if not prices:
                continue
            i = bisect.bisect_right(self._starts[name], at)
            if i:
                return prices[i - 1]
        return None

    def cost(
        self, model: str, at: dt.datetime, prompt_tokens: int, completion_tokens: int
    ) -> Cost | None:
        price = self.lookup(model, at)
        if price is None:
            return None
        return Cost(
            amount=cost_of(price, prompt_tokens, completion_tokens),
            currency=price.currency,
            price_effective_from=price.effective_from,
        )


def cost_of(price: Price, prompt_tokens: int, completion_tokens: int) -> Decimal:
    raw = (
        Decimal(prompt_tokens) * price.prompt_per_1k
        + Decimal(completion_tokens) * price.completion_per_1k
    ) / _THOUSAND
    return raw.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
