"""The ops console: its data endpoint and files in process, and the page itself in a real
headless Chromium (Debian's, driven by Selenium) against a real `serve --workers 2` during a
small real sale: no console error, no CSP violation, charts drawn from the sale's figures,
the switch, and the screenshot the docs show (`docs/images/console.png`, refreshed with
FLASHGATE_DOCS_SCREENSHOTS=1)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api import ADMIN, Client, create, order_body, put_sku
from tests.support.processes import Serve

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "console.png"


def screenshot_path(tmp_path: Path) -> Path:
    """Where the browser test saves its screenshot: the docs' image when
    FLASHGATE_DOCS_SCREENSHOTS=1 (to refresh it), else the test's own folder."""
    if os.environ.get("FLASHGATE_DOCS_SCREENSHOTS") == "1":
        return DOCS_SCREENSHOT
    return tmp_path / "console.png"


async def test_the_console_data_needs_the_token_and_adds_up(client: Client) -> None:
    await put_sku(client, stock=5, per_user_limit=1)
    # the in-process counters are the test process's: what other tests counted is the baseline
    before = (await client.get("/api/v1/admin/console", headers=ADMIN)).json()
    for user in ("a", "b"):
        assert (await create(client, user_id=user)).status_code == 202
    assert (await client.get("/api/v1/admin/console")).status_code == 401
    view = (await client.get("/api/v1/admin/console", headers=ADMIN)).json()
    assert view["mode"] == "NORMAL" and view["breaker"] == "closed"
    (sku,) = view["skus"]
    assert (sku["sku_id"], sku["stock"], sku["available"], sku["held"]) == ("sku-42", 5, 3, 2)
    assert sku["holds"] == 2 and view["entries_in"] == 2
    answered = {code: n - before["answers"].get(code, 0) for code, n in view["answers"].items()}
    assert {code: n for code, n in answered.items() if n} == {"created": 2}
    latency = view["latency"]
    assert len(latency["counts"]) == len(latency["le_ms"]) + 1
    assert latency["counts"][-1] - before["latency"]["counts"][-1] == 2
    assert latency["counts"] == sorted(latency["counts"])
    assert latency["sum_s"] > before["latency"]["sum_s"]
    (worker,) = view["workers"]
    assert worker["breaker"] == "closed" and worker["mode"] in ("NORMAL", None)
    page = await client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert "script-src 'self';" in policy and "style-src 'self';" in policy
    assert b"<style" not in page.content and b"style=" not in page.content
    assert b"sku-42" not in page.content  # the page holds no data; it asks with the token


async def test_the_console_files_are_served_versioned_and_cached(client: Client) -> None:
    page = (await client.get("/console")).text
    for path, kind in (("/console/console.js", "text/javascript"),
                       ("/console/console.css", "text/css"),
                       ("/console/uplot/uPlot.iife.min.js", "text/javascript"),
                       ("/console/uplot/uPlot.min.css", "text/css")):  # fmt: skip
        (link,) = [part.split('"')[0] for part in page.split(f'"{path}?v=')[1:]]
        got = await client.get(f"{path}?v={link}")
        assert got.status_code == 200 and got.headers["content-type"].startswith(kind)
        assert "immutable" in got.headers["cache-control"]
        assert got.headers["x-content-type-options"] == "nosniff"
        assert hashlib.sha256(got.content).hexdigest()[:12] == link
    uplot = (await client.get("/console/uplot/uPlot.iife.min.js")).text
    assert uplot.startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")


def _chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1440,1250",
                 "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    # every CSP violation of every page, kept where the test can read it
    browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": "window.cspViolations = []; document.addEventListener("
         "'securitypolicyviolation', (e) => window.cspViolations.push("
         "e.violatedDirective + ' ' + e.blockedURI));"},
    )  # fmt: skip
    return browser


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


@pytest.mark.integration
def test_the_console_adds_up_every_worker_of_the_instance(tmp_path: Path) -> None:
    """`serve --workers 2`: orders answered by the workers, each on a new connection; the
    view, whichever worker answers it, counts them all and lists both workers."""
    serve = Serve(tmp_path / "data", "--workers", "2")
    try:
        serve.put_hot(5)
        pids = set()
        statuses = []
        for i in range(12):
            r = httpx.post(
                f"{serve.base}/api/v1/order/create",
                json=order_body(user_id=f"w{i}", sku_id="hot"),
                headers={"X-Idempotency-Key": str(uuid.uuid4()), "Connection": "close"},
            )
            statuses.append(r.status_code)
        assert statuses.count(202) == 5 and statuses.count(409) == 7
        for _ in range(400):  # which worker accepts a connection is the kernel's choice
            answer = httpx.get(f"{serve.base}/readyz", headers={"Connection": "close"})
            pids.add(answer.json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2

        def view() -> dict[str, Any]:
            got: dict[str, Any] = httpx.get(
                f"{serve.base}/api/v1/admin/console", headers={**ADMIN, "Connection": "close"}
            ).json()
            return got

        # the other worker's counts reach the files within its next flush (1 s)
        got = _wait(
            "every answer", lambda: (v := view())["answers"] == {"created": 5, "sold_out": 7} and v
        )
        assert got["latency"]["counts"][-1] == 12
        assert {w["pid"] for w in got["workers"]} == pids
        assert {(w["breaker"], w["mode"]) for w in got["workers"]} == {("closed", "NORMAL")}
    finally:
        serve.stop()


def _sale(base: str, stop: threading.Event) -> None:
    """A small sale in rounds of 30 orders every 0.4 s until `stop`: new shoppers (held, then
    sold out), some back for a second unit (limit_exceeded) and some malformed (invalid)."""

    async def rounds() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            n = 0
            while not stop.is_set():
                bodies = [order_body(user_id=f"s{n + i}", sku_id="hot") for i in range(26)]
                bodies += [order_body(user_id=f"s{max(0, n - 1 - i)}", sku_id="hot")
                           for i in range(3)]  # fmt: skip
                bodies.append(order_body(user_id="bad user", sku_id="hot"))
                n += 26
                await asyncio.gather(
                    *(
                        c.post(
                            "/api/v1/order/create",
                            json=body,
                            headers={"X-Idempotency-Key": str(uuid.uuid4())},
                        )
                        for body in bodies
                    )  # fmt: skip
                )
                await asyncio.sleep(0.4)

    asyncio.run(rounds())


def _plotted(browser: Any, chart: str) -> dict[str, float]:
    """The largest value uPlot was given for each series of a chart (the page's own state)."""
    got: dict[str, float] = browser.execute_script(
        "const c = charts[arguments[0]]; const out = {};"
        "c.uplot.series.slice(1).forEach((s, i) => {"
        "  out[s.label] = Math.max(0, ...c.uplot.data[i + 1].filter((v) => v !== null)); });"
        "return out;",
        chart,
    )
    return got


def _problems(browser: Any) -> list[str]:
    """Console errors and CSP violations. A 404 from the rules endpoint is expected while
    the gateway has none: the page then hides its rules panel."""
    logged = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE"
        and not ("/api/v1/admin/rules" in entry["message"] and "404" in entry["message"])
    ]
    return logged + list(browser.execute_script("return window.cspViolations"))


@pytest.mark.browser
@pytest.mark.integration
def test_the_console_in_a_real_browser(tmp_path: Path) -> None:
    """Open the page, give the token, watch a small sale as charts and figures, press the
    switch, confirm, and see every worker of a two-worker gateway follow; no console error,
    no CSP violation; the screenshot the docs show."""
    from selenium.webdriver.common.by import By

    serve = Serve(tmp_path / "data", "--workers", "2")
    browser = _chromium()
    stop = threading.Event()
    selling = threading.Thread(target=_sale, args=(serve.base, stop))
    try:
        serve.put_hot(300)
        browser.get(f"{serve.base}/console")
        browser.find_element(By.ID, "token").send_keys(ADMIN["Authorization"].split()[1])
        browser.find_element(By.ID, "operator").clear()
        browser.find_element(By.ID, "operator").send_keys("alice")
        browser.find_element(By.CSS_SELECTOR, "#login button").click()

        def row() -> list[str]:
            cells = browser.find_elements(By.CSS_SELECTOR, "#skus tr[data-sku='hot'] td")
            return [c.text for c in cells]

        assert _wait("the SKU", lambda: row() and row()[1:5] == ["300", "300", "0", "0"])
        _wait("NORMAL", lambda: browser.find_element(By.ID, "mode").text == "NORMAL")
        selling.start()
        _wait("sold out", lambda: row()[1:5] == ["300", "0", "300", "0"], timeout_s=30)
        bar = browser.find_element(By.CSS_SELECTOR, "#progress .sku[data-sku='hot'] .figure")
        assert bar.text == "0 sold + 300 held of 300 (100 %)"
        _wait("refusals charted", lambda: _plotted(browser, "refusals").get("sold_out", 0) > 0)
        outcomes = _plotted(browser, "outcomes")
        assert outcomes["accepted"] > 0 and outcomes["sold out"] > 0 and outcomes["refused"] > 0
        refusals = _plotted(browser, "refusals")
        assert refusals["limit_exceeded"] > 0 and refusals["invalid_request"] > 0
        latency = _plotted(browser, "latency")
        assert 0 < latency["p50"] <= latency["p99"]
        workers = browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
        assert [w.text.split()[1:] for w in workers] == [["closed", "NORMAL"]] * 2
        # figures the page does not know (another gateway's view) are found and named
        found = browser.execute_script(
            "return extras({mode: 'NORMAL', skus: [], relay_lag: 4, queue: {length: 7},"
            " relays: [{group: 'webhook-g', target: 'webhook', lag: 3, oldest_s: 1.5}]})"
        )
        assert found == {"relay_lag": 4, "queue.length": 7, "relays.webhook-g.lag": 3,
                         "relays.webhook-g.oldest_s": 1.5}  # fmt: skip

        browser.find_element(By.ID, "switch").click()  # the sale goes on, now queued
        alert = browser.switch_to.alert
        assert "QUEUE_ONLY" in alert.text
        alert.accept()
        _wait("QUEUE_ONLY", lambda: browser.find_element(By.ID, "mode").text == "QUEUE_ONLY")
        switched = ["NORMAL", "QUEUE_ONLY", "alice"]

        def history() -> list[str]:
            cells = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr td")
            return [c.text for c in cells[1:4]]

        _wait("the switch in the history", lambda: history() == switched)

        def both_workers_queue_only() -> bool:
            modes = [w.text.split()[2:] for w in browser.find_elements(
                By.CSS_SELECTOR, "#workers tbody tr")]  # fmt: skip
            return modes == [["QUEUE_ONLY"]] * 2

        _wait("both workers in QUEUE_ONLY", both_workers_queue_only)
        time.sleep(3)  # a few seconds of queued intake on the charts, for the screenshot
        shot = screenshot_path(tmp_path)
        shot.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        stop.set()
        selling.join()
        assert _problems(browser) == []
    finally:
        stop.set()
        if selling.is_alive():
            selling.join()
        browser.quit()
        serve.stop()


def _open(browser: Any, serve: Serve, operator: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{serve.base}/console")
    browser.find_element(By.ID, "token").send_keys(ADMIN["Authorization"].split()[1])
    browser.find_element(By.ID, "operator").clear()
    browser.find_element(By.ID, "operator").send_keys(operator)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    _wait("the board", lambda: browser.find_element(By.ID, "board").is_displayed())


def _propose(browser: Any, changes: dict[str, str]) -> list[str]:
    """Type new values, press Review change: the confirm step's lines."""
    from selenium.webdriver.common.by import By

    for name, value in changes.items():
        field = browser.find_element(By.CSS_SELECTOR, f"#rules-table input[name={name}]")
        field.clear()
        field.send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "#rules-form button").click()
    assert browser.find_element(By.ID, "rules-confirm").is_displayed()
    return [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#rules-diff li")]


@pytest.mark.browser
@pytest.mark.integration
def test_the_rules_panel_in_a_real_browser(tmp_path: Path) -> None:
    """The rules panel follows `GET /api/v1/admin/rules`: hidden while it answers 404; else
    the rules in force, a change reviewed then applied by the operator (a bad value refused
    with the gateway's message and nothing applied), and the change in the history."""
    from selenium.webdriver.common.by import By

    serve = Serve(tmp_path / "data")
    browser = _chromium()
    try:
        _open(browser, serve, "bob")
        rules = httpx.get(f"{serve.base}/api/v1/admin/rules", headers=ADMIN)
        if rules.status_code == 404:  # a gateway without runtime rules: the page asked, and hid
            asked = _wait("the page asking for the rules", lambda: [
                e for e in browser.get_log("browser")
                if "/api/v1/admin/rules" in e["message"] and "404" in e["message"]])  # fmt: skip
            assert asked and not browser.find_element(By.ID, "rules").is_displayed()
            assert _problems(browser) == []
            return
        was = rules.json()
        panel = _wait("the rules", lambda: browser.find_element(By.ID, "rules").is_displayed())
        assert panel and browser.find_element(By.ID, "rules-version").text == str(was["version"])

        def in_force(name: str) -> str:
            cell = f"#rules-table tr[data-rule={name}] td:nth-child(2)"
            text: str = browser.find_element(By.CSS_SELECTOR, cell).text
            return text

        qps, ratio = in_force("qps"), in_force("breaker_slow_ratio")
        assert (float(qps), float(ratio)) == (was["qps"], was["breaker_slow_ratio"])

        lines = _propose(browser, {"qps": "1234", "breaker_slow_ratio": "7"})
        assert lines == [f"qps: {qps} → 1234", f"breaker_slow_ratio: {ratio} → 7"]
        browser.find_element(By.ID, "rules-apply").click()
        refused = _wait("the 400", lambda: browser.find_element(By.ID, "rules-error").text)
        assert "400" in refused and "breaker_slow_ratio" in refused
        assert httpx.get(f"{serve.base}/api/v1/admin/rules", headers=ADMIN).json() == was

        assert len(_propose(browser, {"breaker_slow_ratio": "0.6"})) == 2  # qps still edited
        browser.find_element(By.ID, "rules-apply").click()
        _wait("applied", lambda: "applied" in browser.find_element(By.ID, "rules-note").text)
        now = httpx.get(f"{serve.base}/api/v1/admin/rules", headers=ADMIN).json()
        assert (now["qps"], now["breaker_slow_ratio"]) == (1234, 0.6)
        assert now["version"] == was["version"] + 1 and now["history"][0]["by"] == "bob"

        def history() -> str:
            rows = browser.find_elements(By.CSS_SELECTOR, "#rules-history tbody tr")
            return rows[0].text if rows else ""

        changed = _wait("the change in the history", history)
        assert "bob" in changed and "1234" in changed and "0.6" in changed
        # a refused PUT is a failed request in the browser's log; nothing else may be
        assert [p for p in _problems(browser) if "400" not in p] == []
    finally:
        browser.quit()
        serve.stop()
