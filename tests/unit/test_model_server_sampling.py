"""Sampling reproducible per (seed, position)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from model_server.rng import uniform
from model_server.types import Sampling

np = pytest.importorskip("numpy")
sampling = pytest.importorskip("model_server.sampling")


def logits(seed: int = 0, n: int = 1000) -> Any:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32) * 3


def test_greedy_is_argmax() -> None:
    x = logits()
    assert sampling.sample(x, Sampling(temperature=0.0), seed=1, position=0) == int(np.argmax(x))


def test_uniform_depends_only_on_seed_and_position() -> None:
    assert uniform(7, 3) == uniform(7, 3)
    assert uniform(7, 3) != uniform(7, 4) != uniform(8, 3)
    values = [uniform(42, i) for i in range(5000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02


def test_same_seed_and_position_give_the_same_token_in_any_order() -> None:
    x = logits()
    s = Sampling(temperature=1.0, seed=5)
    forward = [sampling.sample(x, s, 5, i) for i in range(50)]
    backward = [sampling.sample(x, s, 5, i) for i in reversed(range(50))][::-1]
    assert forward == backward
    assert len(set(forward)) > 5  # it does sample


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    x = logits(1)
    top5 = set(np.argsort(-x)[:5].tolist())
    s = Sampling(temperature=1.0, top_k=5)
    assert {sampling.sample(x, s, 9, i) for i in range(300)} <= top5
    p = np.array([0.05, 0.3, 0.1, 0.25, 0.2, 0.1] + [1e-4] * 500)
    y = np.log(p / p.sum()).astype(np.float32)
    s = Sampling(temperature=1.0, top_p=0.5)
    drawn = {sampling.sample(y, s, 9, i) for i in range(500)}
    assert drawn == {1, 3}  # 0.3 + 0.25 is the smallest set reaching 0.5


def test_sampling_follows_the_distribution() -> None:
    x = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    s = Sampling(temperature=1.0)
    counts = np.bincount([sampling.sample(x, s, 3, i) for i in range(4000)], minlength=3)
    assert np.allclose(counts / 4000, [0.7, 0.2, 0.1], atol=0.03)


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    x = logits(2, 50)
    lp = sampling.logprobs(x, 3, 4)
    ref = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum())
    assert math.isclose(lp.logprob, ref[3], rel_tol=1e-9)
    assert [t for t, _ in lp.top] == np.argsort(-ref)[:4].tolist()
