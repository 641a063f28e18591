"""Workers announce what their model servers serve: a real worker process, a real (synthetic)
model server and the broker; a catalog follower sees the model with the server's limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmstream import catalog, config, kafka
from llmstream_tools import stack

pytestmark = pytest.mark.integration


async def test_worker_announces_its_model_servers_models(tmp_path: Path) -> None:
    async with stack.local_stack(
        tmp_path,
        workers=1,
        gateways=1,
        extra_env={config.PREFIX + "CATALOG_ANNOUNCE_S": "0.5"},
    ) as st:
        follower = catalog.CatalogFollower(
            kafka.Connection(config.kafka_bootstrap()),
            st.env[config.PREFIX + "TOPIC_MODELS"],
            "test-catalog",
            fetch_max_wait_ms=50,
        )
        task = asyncio.create_task(follower.run())
        try:
            async with asyncio.timeout(60):  # a hang guard, not a speed limit
                while not follower.catalog.last_known("synthetic"):
                    assert not task.done(), task
                    await asyncio.sleep(0.05)
            entry = follower.catalog.last_known("synthetic")
            assert entry is not None
            assert entry.engine == "synthetic"
            assert entry.max_context > 0 and entry.max_tokens > 0
            assert entry.announcer_id.endswith(".w0")  # the worker's --id
            assert entry.interval_ms == 500
            assert len(entry.model_servers) == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
