"""The browser layer end to end, in a real browser (Debian's Chromium, headless): the chat
page reads the real service's stream with chunkwatch.js, sends its beacon to the service's
endpoint, and the service records the `browser` layer — metrics, a span in the request's
trace, and the funnel the page then shows. Through the fault gateway on the downstream side
(in front of the service, as a reverse proxy), a buffering hop makes the browser layer
`buffered` and a cutting hop `truncated`/`lost` while the service's own sse layer is `ok`.
All on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from chunkwatch import semconv as sc
from chunkwatch.testing import Capture
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running

from ..helpers import downstream_system

if TYPE_CHECKING:
    from .browser import Tab

pytest_plugins = ("tests.lab.browser",)

OpenTab = Callable[[str], "Tab"]
TOKENS = 30  # written over about 0.6 s: long enough that one burst is not the writing
PROMPT = "Where did the stream stop?"


@dataclass
class System:
    service: ServiceThread
    gateway: Running[Gateway]
    capture: Capture
    before: dict[str, float] | None = None  # the browser outcomes counted before a test

    def browser_streams(self) -> dict[str, float]:
        """The browser layer's outcomes counted since the test began (the registry is the
        module's)."""
        before = self.before or {}
        now = self.capture.streams(sc.BROWSER)
        return {k: v - before.get(k, 0.0) for k, v in now.items() if v - before.get(k, 0.0)}

    def wait_for_browser(self, n: int = 1, timeout: float = 10.0) -> dict[str, float]:
        """The browser layer's outcomes, once ``n`` beacons were recorded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.browser_streams()
            if sum(got.values()) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"no browser stream recorded: {self.browser_streams()}")


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    """Upstream → service → downstream gateway. The gateway rewrites Host, as a reverse
    proxy does by default, and says the browser's host in X-Forwarded-Host: the page's
    beacons through it are same-origin."""
    with downstream_system(tokens=TOKENS, token_delay=0.02) as (_, service, gw, cap):
        yield System(service, gw, cap)


@pytest.fixture(autouse=True)
def fresh(system: System) -> None:
    system.gateway.server.set_fault("pass")
    system.capture.clear()
    system.before = None
    system.before = system.browser_streams()


def ask(tab: Tab) -> str:
    tab.open()
    tab.ask(PROMPT)
    return tab.wait_for_state("done", "error", "stopped")


def test_healthy_the_browser_layer_matches_sse_and_the_page_shows_the_funnel(
    system: System, open_tab: OpenTab
) -> None:
    """Straight to the service: the browser received as many events as sse wrote, `ok`;
    its chunks, time to first chunk and a `browser stream` span in the request's trace;
    the page fills the server rows from the service's report."""
    tab = open_tab(system.service.url)
    assert ask(tab) == "done"
    (verdict,) = system.capture.wait_for_verdicts(1)
    written = verdict.funnel["sse"]
    assert written == TOKENS + 1
    assert system.wait_for_browser() == {"ok": 1.0}
    assert tab.last_stream()["beacon"] == "sent"
    (upstream,) = {t.upstream for t in verdict.ledger.tallies if t.layer == sc.SSE}
    chunks = system.capture.sample("chunkwatch_chunks_total", layer="browser", upstream=upstream)
    assert chunks == written
    ttfc = system.capture.sample(
        "chunkwatch_time_to_first_chunk_seconds_count", layer="browser", upstream=upstream
    )
    assert ttfc == 1
    assert verdict.trace_id is not None
    deadline = time.monotonic() + 5
    while True:
        spans = [s for s in system.capture.spans_of(verdict.trace_id) if s.name == "browser stream"]
        if spans or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (span,) = spans
    assert span.attributes is not None
    assert span.attributes[sc.A_OUTCOME] == "ok" and span.attributes[sc.A_CHUNKS] == written
    assert span.attributes[sc.A_BROWSER_WRITTEN] == written
    tab.page.wait_for_selector("body[data-browser-outcome]", state="attached")
    assert tab.evaluate("document.body.dataset.browserOutcome") == "ok"
    sse_row = tab.page.locator('tr[data-layer="sse"] td').all_inner_texts()
    assert sse_row[0] == str(written)
    assert "The browser layer: ok." in tab.text("#server-slot")


def test_a_buffering_hop_makes_the_browser_layer_buffered(
    system: System, open_tab: OpenTab
) -> None:
    """buffer-until-end in front of the service (nginx proxy_buffering on): the service's
    sse layer wrote over half a second and says `ok`; the browser got every event, all at
    once after the last write: `buffered`."""
    system.gateway.server.set_fault("buffer-until-end")
    tab = open_tab(system.gateway.url)
    assert ask(tab) == "done"
    (verdict,) = system.capture.wait_for_verdicts(1)
    assert verdict.ok
    stream = tab.last_stream()
    assert stream["events"] == verdict.funnel["sse"]
    assert system.wait_for_browser() == {"buffered": 1.0}


def test_a_hop_that_cuts_the_stream_makes_the_browser_layer_lose_it(
    system: System, open_tab: OpenTab
) -> None:
    """close-after-events: the hop closes after 3 events; the browser saw no terminal event,
    so its layer is `truncated` (fewer events than written, and no end)."""
    system.gateway.server.set_fault("close-after-events", events=3)
    tab = open_tab(system.gateway.url)
    assert ask(tab) == "error"
    assert tab.last_stream()["events"] == 3
    got = system.wait_for_browser()
    assert set(got) <= {"truncated", "lost"} and sum(got.values()) == 1, got
