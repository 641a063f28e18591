"""The browser page's SSE switch in real headless Chromium (Playwright): a chat completion
streamed over fetch from the OpenAI-compatible API, reloaded mid-stream, resumed with its last
event id and finished exactly."""

from __future__ import annotations

import pytest

from llmstream_tools.testing import gateway as testing
from llmstream_tools.testing.gateway import FakeWorker, Topics
from tests.integration.browser import chromium_page, expect, sign_in

pytestmark = pytest.mark.integration


topics = testing.topics_fixture(2)


async def test_page_streams_over_sse_and_resumes_after_reload(
    topics: Topics, db_env: str, redis_url: str
) -> None:
    s = testing.settings(topics, redis_url, db_env, "gw-sse-web", [0, 1])
    _tenant, _name, key = await testing.new_tenant()
    async with (
        testing.running(s),
        FakeWorker(topics, itl_s=0.04),
        chromium_page() as page,
    ):
        requests: list[tuple[str, str]] = []
        page.on("request", lambda r: requests.append((r.method, r.url)))
        base = f"http://127.0.0.1:{s.port}"
        await sign_in(page, base, key)
        await page.get_by_test_id("use-sse").check()
        await page.get_by_test_id("prompt").fill("over SSE")
        await page.get_by_test_id("max-tokens").fill("80")
        await page.get_by_test_id("send").click()
        panel = page.get_by_test_id("panel").nth(0)
        await expect(panel.get_by_test_id("status")).to_have_text("streaming")
        rid = await panel.get_attribute("data-request-id")
        assert rid
        await expect(panel.locator(".seq")).not_to_have_text("0")
        await page.reload()
        panel = page.locator(f'[data-request-id="{rid}"]')
        await expect(panel.get_by_test_id("status")).to_have_text("length", timeout=20_000)
        text = await panel.get_by_test_id("text").text_content()
        assert text == "".join(testing.token_text(rid, q) for q in range(1, 81))
        assert ("POST", base + "/v1/chat/completions") in requests
        assert ("GET", f"{base}/v1/chat/completions/{rid}/stream") in requests
        # The switch survives the reload (sessionStorage).
        assert await page.get_by_test_id("use-sse").is_checked()
