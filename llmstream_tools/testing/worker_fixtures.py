"""Pytest fixtures of the worker's integration tests. Each test module binds them under the names
its tests use (`topics = worker_topics`): a module's fixture takes precedence over the
integration conftest's `topics` (the aggregator's)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmstream.ports import free_port
from llmstream_tools.testing.worker import (
    Proc,
    Topics,
    create_topics,
    delete_topics,
    start_model_server,
    wait_model_server,
)


@pytest.fixture
async def worker_topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    """Fresh prompts/tokens/dlq topics and group names, deleted after the test."""
    t = await create_topics(kafka_bootstrap)
    yield t
    await delete_topics(t)


@pytest.fixture
def worker_procs() -> Iterator[list[Proc]]:
    """Processes a test starts; killed after it (whatever it left running)."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


@contextlib.contextmanager
def synthetic_model_server(folder: Path, itl_ms: int, ttft_ms: int) -> Iterator[str]:
    """A synthetic model server process, serving when the block starts; killed after it. For
    module-scoped `model_server` fixtures (called outside any event loop)."""
    port = free_port()
    proc = start_model_server(folder, port, itl_ms=itl_ms, ttft_ms=ttft_ms)
    addr = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_model_server(addr))
        yield addr
    finally:
        proc.kill()
