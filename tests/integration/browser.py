"""Real headless Chromium for the browser-page tests: Debian's `chromium` driven by Playwright.
`make test` installs both (deploy/local/system-deps.sh, the dev extras), so a missing one is a
failure, not a skip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from playwright import async_api

CHROMIUM = Path("/usr/bin/chromium")
expect = async_api.expect


@asynccontextmanager
async def chromium_page() -> AsyncIterator[Any]:
    """A fresh page of a headless Chromium, closed afterwards."""
    assert await asyncio.to_thread(CHROMIUM.exists), (
        f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    )
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def sign_in(page: Any, base: str, key: str) -> None:
    """Open the page and sign in with an API key; returns once its WebSocket is connected."""
    await page.goto(base + "/")
    await page.get_by_test_id("apikey").fill(key)
    await page.get_by_test_id("signin").click()
    await expect(page.get_by_test_id("conn-state")).to_have_text("connected")
