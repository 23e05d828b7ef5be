"""Browser fixtures: Debian's Chromium driven by Playwright, against the real service.

``scripts/bootstrap --test`` installs the ``chromium`` package; Playwright launches that
binary (``executable_path``) and never downloads a browser of its own. A missing
Chromium fails the tests, naming the install step: browser tests are never skipped.

Use from a test module with ``pytest_plugins = ("tests.lab.browser",)``:

* ``chromium`` (module) — the headless browser;
* ``open_tab`` — opens the service's page in a fresh browser context and yields a
  :class:`Tab`; every request to a host other than loopback is refused and recorded, and
  the test fails at teardown if there was one, or a script error on the page.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route, sync_playwright

# The Debian package's launcher (it execs /usr/lib/chromium/chromium with the distribution's
# flags). Playwright's own browser builds are never used: this machine cannot fetch them.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
TIMEOUT_MS = 20_000  # one answer: a few hundred ms; this bounds a hang, not the happy path


@dataclass
class Tab:
    """The service's page in a browser context of its own."""

    page: Page
    base_url: str
    outside: list[str] = field(default_factory=list)  # non-loopback requests, refused
    errors: list[str] = field(default_factory=list)  # uncaught errors and console errors
    chats: list[str] = field(default_factory=list)  # every POST /chat the page made

    def open(self, path: str = "/") -> None:
        """Load ``path`` and wait until the page's module ran (the form is live)."""
        self.page.goto(self.base_url + path)
        self.page.wait_for_function("document.body.dataset.state !== undefined")

    def ask(self, message: str) -> None:
        self.page.get_by_label("Your message").fill(message)
        self.page.get_by_role("button", name="Send").click()

    def wait_for_state(self, *states: str) -> str:
        """Wait until the page's state (``body[data-state]``) is one of ``states``."""
        selector = ", ".join(f'body[data-state="{s}"]' for s in states)
        self.page.wait_for_selector(selector, state="attached", timeout=TIMEOUT_MS)
        return str(self.page.evaluate("document.body.dataset.state"))

    def last_stream(self) -> dict[str, Any]:
        """chunkwatch.js's ``lastStream()`` in the page (the module instance the page uses)."""
        got = self.page.evaluate("import('/chunkwatch.js').then(m => m.lastStream())")
        assert isinstance(got, dict), got
        return got

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def evaluate(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)


def _is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return parts.hostname in LOOPBACK


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Headless Chromium from the Debian package, for one test module. Not for the session:
    while Playwright's sync API is started, its event loop counts as running in the main
    thread, and every later test's ``asyncio.run()`` would fail."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `scripts/bootstrap --test` installs Debian's chromium")
    # Belt and braces: nothing in a test run may make Playwright fetch a browser.
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def tab_on(browser: Browser, base_url: str) -> Iterator[Tab]:
    """A fresh context (no cache, no storage) on ``base_url``; checks it stayed on loopback
    and raised no script error."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    tab = Tab(page, base_url.rstrip("/"))

    def only_loopback(route: Route) -> None:
        if _is_loopback(route.request.url):
            route.continue_()
        else:
            tab.outside.append(route.request.url)
            route.abort()

    def on_request(request: Request) -> None:
        if request.method == "POST" and urlsplit(request.url).path == "/chat":
            tab.chats.append(request.url)

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            tab.errors.append(f"console: {msg.text}")

    context.route("**/*", only_loopback)
    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: tab.errors.append(f"pageerror: {exc}"))
    try:
        yield tab
    finally:
        context.close()
    assert tab.outside == [], f"the page asked for something off loopback: {tab.outside}"
    assert tab.errors == [], tab.errors


@pytest.fixture
def open_tab(chromium: Browser) -> Iterator[Callable[[str], Tab]]:
    """``open_tab(base_url)`` → a :class:`Tab`; all of them closed and checked at teardown."""
    with ExitStack() as stack:
        yield lambda base_url: stack.enter_context(tab_on(chromium, base_url))


def record_answer_changes(tab: Tab) -> None:
    """From now on, ``window.changes`` gets ``[time, length]`` at each change of the page's
    answer box: when the answer grew, and to what."""
    tab.evaluate(
        """() => {
            const box = document.getElementById('answer');
            window.changes = [];
            new MutationObserver(() => {
              window.changes.push([performance.now(), box.textContent.length]);
            }).observe(box, {childList: true, characterData: true, subtree: true});
        }"""
    )
