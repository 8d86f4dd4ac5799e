"""The ops console: its data endpoint in process, and the page itself in a real headless
Chromium (Debian's, driven by Selenium) against a real `serve --workers 2`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api import ADMIN, Client, create, put_sku
from tests.support.processes import Serve, stampede


async def test_the_console_data_needs_the_token_and_adds_up(client: Client) -> None:
    await put_sku(client, stock=5, per_user_limit=1)
    for user in ("a", "b"):
        assert (await create(client, user_id=user)).status_code == 202
    assert (await client.get("/api/v1/admin/console")).status_code == 401
    view = (await client.get("/api/v1/admin/console", headers=ADMIN)).json()
    assert view["mode"] == "NORMAL" and view["breaker"] == "closed"
    (sku,) = view["skus"]
    assert (sku["sku_id"], sku["stock"], sku["available"], sku["held"]) == ("sku-42", 5, 3, 2)
    assert sku["holds"] == 2 and view["entries_in"] == 2
    page = await client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert b"sku-42" not in page.content  # the page holds no data; it asks with the token


def _chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _wait(what: str, check: Any, timeout_s: float = 10.0) -> Any:
    """`check()` until it gives something true. The page re-renders its tables every second, so
    an element found may be replaced before it is read: that is "not yet", not a failure."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except StaleElementReferenceException:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}")
        time.sleep(0.1)


@pytest.mark.browser
@pytest.mark.integration
def test_the_console_in_a_real_browser(tmp_path: Path) -> None:
    """Open the page, give the token, watch the figures move after orders, press the switch,
    confirm, and see every worker of a two-worker gateway follow."""
    from selenium.webdriver.common.by import By

    serve = Serve(tmp_path / "data", "--workers", "2")
    browser = _chromium()
    try:
        serve.put_hot(40)
        browser.get(f"{serve.base}/console")
        browser.find_element(By.ID, "token").send_keys(ADMIN["Authorization"].split()[1])
        browser.find_element(By.ID, "operator").clear()
        browser.find_element(By.ID, "operator").send_keys("alice")
        browser.find_element(By.CSS_SELECTOR, "#login button").click()

        def row() -> list[str]:
            cells = browser.find_elements(By.CSS_SELECTOR, "#skus tr[data-sku='hot'] td")
            return [c.text for c in cells]

        assert _wait("the SKU", lambda: row() and row()[1:5] == ["40", "40", "0", "0"])
        _wait("NORMAL", lambda: browser.find_element(By.ID, "mode").text == "NORMAL")
        assert asyncio.run(stampede(serve.base, 25, "hot")) == {202: 25}
        _wait("25 held", lambda: row()[1:5] == ["40", "15", "25", "0"])
        assert float(_wait("a rate", lambda: browser.find_element(By.ID, "rate").text)) >= 0

        browser.find_element(By.ID, "switch").click()
        alert = browser.switch_to.alert
        assert "QUEUE_ONLY" in alert.text
        alert.accept()
        _wait("QUEUE_ONLY", lambda: browser.find_element(By.ID, "mode").text == "QUEUE_ONLY")
        switched = ["NORMAL", "QUEUE_ONLY", "alice"]

        def history() -> list[str]:
            cells = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr td")
            return [c.text for c in cells[1:4]]

        _wait("the switch in the history", lambda: history() == switched)

        def both_workers_queue_only() -> set[tuple[int, str]] | None:
            seen = set()
            for _ in range(10):  # new connections: each worker answers some
                r = httpx.get(f"{serve.base}/readyz", headers={"Connection": "close"})
                seen.add((r.json()["pid"], r.json()["mode"]))
            modes = {mode for _, mode in seen}
            return seen if modes == {"QUEUE_ONLY"} and len(seen) == 2 else None

        assert len(_wait("both workers in QUEUE_ONLY", both_workers_queue_only)) == 2
    finally:
        browser.quit()
        serve.stop()
