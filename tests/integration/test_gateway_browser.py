"""The browser page in real headless Chromium (Playwright): sign in, two concurrent streams,
cancel one, reload mid-stream and see the other resume and finish exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import FakeWorker, Topics
from tests.integration.browser import chromium_page, expect, sign_in

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


topics = testing.topics_fixture(2)


async def test_page_streams_cancels_and_resumes_after_reload(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-web", [0, 1])
    _tenant, _name, key = await testing.new_tenant()
    ARTIFACTS.mkdir(exist_ok=True)
    async with (
        testing.running(s),
        FakeWorker(topics, itl_s=0.04),
        chromium_page() as page,
    ):
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        base = f"http://127.0.0.1:{s.port}"
        await sign_in(page, base, key)
        panels = page.get_by_test_id("panel")
        await page.get_by_test_id("prompt").fill("first: a long one")
        await page.get_by_test_id("max-tokens").fill("400")
        await page.get_by_test_id("send").click()
        await expect(panels).to_have_count(1)
        await page.get_by_test_id("prompt").fill("second")
        await page.get_by_test_id("max-tokens").fill("80")
        await page.get_by_test_id("send").click()
        await expect(panels).to_have_count(2)
        second, first = panels.nth(0), panels.nth(1)  # newest first
        rid_first = await first.get_attribute("data-request-id")
        rid_second = await second.get_attribute("data-request-id")
        assert rid_first and rid_second
        # Both stream at once.
        for p in (first, second):
            await expect(p.get_by_test_id("status")).to_have_text("streaming")
        await first.get_by_test_id("cancel").click()
        await expect(first.get_by_test_id("status")).to_have_text("cancelled", timeout=10_000)
        # Reload mid-stream: the second request resumes from sessionStorage and finishes.
        await expect(second.locator(".seq")).not_to_have_text("0")
        await page.reload()
        second = page.locator(f'[data-request-id="{rid_second}"]')
        await expect(page.get_by_test_id("conn-state")).to_have_text("connected")
        await expect(second.get_by_test_id("status")).to_have_text("length", timeout=20_000)
        text = await second.get_by_test_id("text").text_content()
        assert text == "".join(testing.token_text(rid_second, q) for q in range(1, 81))
        assert await second.get_by_test_id("ttft").text_content() != "\u2013"
        assert await second.get_by_test_id("tps").text_content() != "\u2013"
        await page.screenshot(path=str(ARTIFACTS / "gateway-page.png"), full_page=True)
        assert all(u.startswith(base) or u.startswith("ws://127.0.0.1") for u in requests)
