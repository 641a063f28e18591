"""Prices: effective dating, the wildcard model, exact decimal cost."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from aggregator.ledger import Price, PriceBook, cost_of


def t(day: int) -> dt.datetime:
    return dt.datetime(2026, 1, day, tzinfo=dt.UTC)


BOOK = PriceBook(
    [
        Price("big", t(10), Decimal("2"), Decimal("6")),
        Price("big", t(1), Decimal("1"), Decimal("3")),
        Price("*", t(5), Decimal("0.1"), Decimal("0.2"), "EUR"),
    ]
)


def test_latest_price_effective_at_the_time_wins() -> None:
    assert BOOK.lookup("big", t(1)) == Price("big", t(1), Decimal("1"), Decimal("3"))
    assert BOOK.lookup("big", t(9)).prompt_per_1k == Decimal("1")  # type: ignore[union-attr]
    assert BOOK.lookup("big", t(10)).prompt_per_1k == Decimal("2")  # type: ignore[union-attr]
    assert BOOK.lookup("big", t(28)).prompt_per_1k == Decimal("2")  # type: ignore[union-attr]


def test_wildcard_prices_other_models_and_before_own_price_nothing_is_invented() -> None:
    assert BOOK.lookup("small", t(6)).currency == "EUR"  # type: ignore[union-attr]
    assert BOOK.lookup("small", t(4)) is None
    # "big" before its first own price falls back to the wildcard only if that is effective.
    only_future = PriceBook([Price("x", t(20), Decimal(1), Decimal(1))])
    assert only_future.cost("x", t(19), 10, 10) is None


def test_cost_is_exact_and_rounded_half_even_to_nanos() -> None:
    price = Price("m", t(1), Decimal("0.0015"), Decimal("0.002"))
    assert cost_of(price, 1000, 500) == Decimal("0.002500000")
    assert cost_of(price, 1, 0) == Decimal("0.000001500")
    tiny = Price("m", t(1), Decimal("0.0000005"), Decimal(0))
    assert cost_of(tiny, 1, 0) == Decimal("0")  # 0.0000000005 -> half-even -> 0
    assert cost_of(tiny, 3, 0) == Decimal("0.000000002")  # 0.0000000015 -> 0.000000002
    c = BOOK.cost("big", t(12), 1500, 250)
    assert c is not None and c.amount == Decimal("4.5") and c.price_effective_from == t(10)
