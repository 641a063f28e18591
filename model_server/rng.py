"""Counter-based pseudo-random numbers: pure functions of their inputs (no hidden state)."""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64 finalizer: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 64-bit hash of a tuple of integers (order matters)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = splitmix64(h ^ (v & _MASK64))
    return h


def uniform(seed: int, position: int) -> float:
    """A float in [0, 1) that depends only on (seed, position)."""
    return (mix(seed, position) >> 11) * 2.0**-53
