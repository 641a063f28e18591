"""Token sampling from a logits vector, reproducible per (seed, position).

llama.cpp's own sampler chain keeps one RNG per sampler and advances it with every token, so
a generation resumed after k tokens would draw different random numbers than the
uninterrupted run. Here the only random number used for the token at completion position
``i`` is ``rng.uniform(seed, i)``, a pure function (SplitMix64 of the seed mixed with the
position). Resuming from k logged tokens therefore reproduces the uninterrupted run exactly,
provided the logits are bitwise identical (see ``engines/llamacpp.py`` for how the
continuation is replayed to guarantee that).

Order of operations (as in vLLM): temperature, then top-k, then top-p, then one draw by
inverse CDF. Temperature 0 is greedy (argmax, no randomness). Log-probabilities are those of
the raw model distribution (before temperature and truncation).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from model_server.rng import uniform
from model_server.types import Sampling, TokenLogprobs


def _nucleus(probs: npt.NDArray[np.float64], top_p: float) -> npt.NDArray[np.intp]:
    """Indices of the smallest set of most likely tokens whose mass reaches top_p, by
    decreasing probability. Sorts only as much of the vocabulary as needed."""
    n = probs.size
    target = top_p * float(probs.sum())
    k = 64
    while True:
        if k >= n:
            order = np.argsort(-probs, kind="stable")
            break
        part = np.argpartition(-probs, k)[:k]
        order = part[np.argsort(-probs[part], kind="stable")]
        if float(probs[order].sum()) >= target:
            break
        k *= 8
    cum = np.cumsum(probs[order])
    cut = int(np.searchsorted(cum, target)) + 1
    return order[: min(cut, order.size)]


def sample(logits: npt.NDArray[np.float32], sampling: Sampling, seed: int, position: int) -> int:
    """The token for completion position ``position``."""
    if sampling.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / sampling.temperature
    candidates: npt.NDArray[np.intp] | None = None
    if 0 < sampling.top_k < x.size:
        candidates = np.argpartition(x, x.size - sampling.top_k)[x.size - sampling.top_k :]
        candidates.sort()
        x = x[candidates]
    probs = np.exp(x - x.max())
    if sampling.top_p < 1.0:
        keep = _nucleus(probs, sampling.top_p)
        candidates = keep if candidates is None else candidates[keep]
        probs = probs[keep]
    cum = np.cumsum(probs)
    r = uniform(seed, position) * float(cum[-1])
    i = min(int(np.searchsorted(cum, r, side="right")), cum.size - 1)
    return int(candidates[i]) if candidates is not None else i


def logprobs(logits: npt.NDArray[np.float32], token_id: int, top_n: int) -> TokenLogprobs:
    """Log-probability of ``token_id`` and the ``top_n`` most likely tokens (raw model)."""
    x = logits.astype(np.float64)
    m = float(x.max())
    lse = m + math.log(float(np.exp(x - m).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        part = np.argpartition(-x, top_n)[:top_n]
        part = part[np.argsort(-x[part], kind="stable")]
        top = tuple((int(t), float(x[t]) - lse) for t in part)
    return TokenLogprobs(token_id=token_id, logprob=float(x[token_id]) - lse, top=top)
