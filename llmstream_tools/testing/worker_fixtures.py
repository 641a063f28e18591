"""Pytest fixtures of the worker's integration tests. Each test module binds them under the names
its tests use (`topics = worker_topics`): a module's fixture takes precedence over the
integration conftest's `topics` (the aggregator's)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from llmstream_tools.testing.worker import Proc, Topics, create_topics, delete_topics


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
