"""Ports a local `llmstream up` uses beyond the settings' defaults.

The gateway's `/metrics` port defaults to 0 (off) because every in-process test gateway reads
the same default and two of them cannot share a port; `llmstream up` runs one gateway, so it
turns it on at a fixed port that `llmstream top` and the local Prometheus also look at.
"""

from __future__ import annotations

from llmstream import config

UP_GATEWAY_METRICS_PORT = 9101


def gateway_metrics_port() -> int:
    """LLMSTREAM_GATEWAY_METRICS_PORT when set, else the port `llmstream up` gives it."""
    return config.get_int("GATEWAY_METRICS_PORT") or UP_GATEWAY_METRICS_PORT
